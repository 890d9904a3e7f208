"""Every stage a user waits on shows progress: plain lines when the output is not a terminal."""

from __future__ import annotations

import io

from vidtrain.utils.progress import StepProgress


def test_progress_prints_about_ten_lines_with_both_dmd_losses():
    out = io.StringIO()
    p = StepProgress(30, 0, "train[dmd]", stream=out)
    for step in range(30):
        logs = {"loss": 1.0, "critic_loss": 1.0 - step / 100}
        if step % 5 == 0:
            logs["generator_loss"] = 2.0 + step
        p.update(logs)
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 10 and lines[-1].startswith("[vidtrain] train[dmd] step 30/30 ")
    assert "generator 27.0000" in lines[-1] and "critic 0.7100" in lines[-1]  # the latest of each
    assert " loss " not in lines[-1] and "s/step, eta 0 s)" in lines[-1]


def test_progress_is_silent_when_off_or_done():
    out = io.StringIO()
    for p in (StepProgress(5, 0, "x", enabled=False, stream=out), StepProgress(5, 5, "x", stream=out)):
        p.update({"loss": 1.0})
        p.close()
    assert out.getvalue() == ""


def test_progress_counts_any_unit_with_its_own_figures():
    out = io.StringIO()
    p = StepProgress(4, 0, "sample", stream=out, unit="chunk", keys=("generate_s",))
    for i in range(4):
        p.update({"generate_s": 0.5 + i, "loss": 9.0})  # only the asked-for figures are shown
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and lines[-1].startswith("[vidtrain] sample chunk 4/4 generate_s 3.5000 (")
    assert "loss" not in lines[-1] and "s/chunk, eta 0 s)" in lines[-1]
