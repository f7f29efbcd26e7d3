"""The live view and the plain log lines, rendered from fake step records."""

from __future__ import annotations

import io

from rich.console import Console

from pstar_cli.observe.live import LiveView, NullView, PlainLog, RunInfo, TeeView, choose_view, format_log_line

MIB = 2**20
INFO = RunInfo(title="gpt-mini · fp32 · 1 rank · cpu", total_steps=100, device_label="device")


def fake_record(step: int, **changes) -> dict:
    record = {
        "step": step, "loss": 2.3456, "lr": 3e-4, "loss_scale": 1.0, "skipped": False,
        "tokens_per_s": 12345.6, "tflops": 0.0123, "step_s": 0.25,
        "gpu_mem_bytes": None, "gpu_total_bytes": None, "gpu_peak_allocated_bytes": None,
        "host_rss_bytes": 1536 * MIB, "host_total_bytes": 24 * 1024 * MIB,
        "param_chunks_device": 4, "param_chunks_host": 2, "param_bytes_device": 16 * MIB,
        "param_bytes_host": 8 * MIB, "optim_chunks_device": 3, "optim_chunks_host": 9,
        "optim_bytes_device": 48 * MIB, "optim_bytes_host": 144 * MIB,
        "step_h2d_moves": 7, "step_h2d_bytes": 28 * MIB, "step_d2h_moves": 5, "step_d2h_bytes": 20 * MIB,
        "total_h2d_moves": 300, "total_h2d_bytes": 1200 * MIB, "total_d2h_moves": 200,
        "total_d2h_bytes": 800 * MIB, "device_budget_bytes": 64 * MIB, "host_budget_bytes": 20 * 1024 * MIB,
        "model_data_bytes": 216 * MIB,
    }
    record.update(changes)
    return record


def recording_console(width: int = 100) -> Console:
    return Console(record=True, force_terminal=True, width=width, file=io.StringIO())


def test_live_view_shows_progress_metrics_memory_and_placement():
    console = recording_console()
    view = LiveView(INFO, console=console)
    view.on_step(fake_record(42), logged=True)
    console.print(view.render())
    text = console.export_text()
    assert "pstar train · gpt-mini" in text
    assert "━" in text and "42/100" in text and "eta" in text  # progress bar with ETA
    for expected in ("step 42", "loss 2.3456", "lr 3.000e-04", "loss scale 1", "tokens/s 12,346",
                     "TFLOPS 0.01", "step 0.250 s"):
        assert expected in text, expected
    assert "GPU memory: no GPU" in text and "host memory 1.50 GiB RSS / 24.0 GiB" in text
    assert "chunk placement" in text
    assert "on device" in text and "on host" in text
    assert "4 · 16.0 MiB" in text and "2 · 8.00 MiB" in text  # params: device, host
    assert "3 · 48.0 MiB" in text and "9 · 144.0 MiB" in text  # optimizer: device, host
    assert "7 · 28.0 MiB" in text and "5 · 20.0 MiB" in text  # H2D and D2H of the last step
    assert "budget: device 64.0 MiB" in text
    assert "gathers" not in text  # one rank gathers nothing


def test_live_view_counts_gathers_with_several_ranks():
    console = recording_console()
    view = LiveView(INFO, console=console)
    view.on_step(fake_record(3, step_gathers=22, total_gathers=66), logged=True)
    console.print(view.render())
    line = next(line for line in console.export_text().splitlines() if "gathers" in line)
    assert "22" in line and "66" in line


def test_live_view_on_a_gpu_and_keeps_the_last_loss_between_log_steps():
    info = RunInfo(title="gpt-4b · bf16 · 1 rank · cuda", total_steps=10, device_label="GPU")
    console = recording_console()
    view = LiveView(info, console=console)
    view.on_step(fake_record(1, gpu_mem_bytes=40 * 1024 * MIB, gpu_total_bytes=140 * 1024 * MIB,
                             gpu_peak_allocated_bytes=38 * 1024 * MIB), logged=True)
    view.on_step(fake_record(2, loss=None, skipped=True), logged=False)
    console.print(view.render())
    text = console.export_text()
    assert "GPU memory 40.0 GiB / 140.0 GiB (peak allocated 38.0 GiB)" in text
    assert "on GPU" in text and "budget: GPU" in text
    assert "loss 2.3456" in text and "skipped" in text and "2/10" in text


def test_live_view_draws_every_step_on_a_terminal():
    console = recording_console()
    with LiveView(INFO, console=console) as view:
        for step in range(1, 4):
            view.on_step(fake_record(step, loss=3.0 - step / 10), logged=True)
    text = console.export_text()
    assert "3/100" in text and "loss 2.7000" in text
    assert "\x1b[" in console.file.getvalue()  # drawn with terminal control codes


def test_plain_log_prints_logged_steps_only():
    stream = io.StringIO()
    with PlainLog(INFO, stream=stream) as log:
        log.on_step(fake_record(1), logged=True)
        log.on_step(fake_record(2), logged=False)
        log.on_step(fake_record(10, loss=1.5), logged=True)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("pstar train: gpt-mini")
    assert len(lines) == 3
    assert lines[1].startswith("step 1/100 | loss 2.3456 | lr 3.00e-04")
    assert "12,346 tok/s" in lines[2] and "0.01 TFLOPS" in lines[2] and "loss 1.5000" in lines[2]
    assert "h2d 7 d2h 5" in lines[2]
    assert "\x1b[" not in stream.getvalue()


def test_plain_log_line_without_engine_stats():
    line = format_log_line({"step": 3, "loss": None, "host_rss_bytes": 2**30}, INFO)
    assert line.startswith("step 3/100 | loss -") and "rss 1.00 GiB" in line and "chunks" not in line


def test_choose_view_by_rank_and_terminal(tmp_path):
    assert isinstance(choose_view(INFO, is_main=True, is_tty=True), LiveView)
    assert isinstance(choose_view(INFO, is_main=True, is_tty=False), PlainLog)
    assert isinstance(choose_view(INFO, is_main=False, is_tty=True), PlainLog)
    tee = choose_view(INFO, is_main=True, is_tty=True, log_path=tmp_path / "logs" / "rank0.log")
    assert isinstance(tee, TeeView) and tee.live
    assert not NullView.live and not PlainLog.live


def test_tee_view_keeps_a_log_file_next_to_the_live_view(tmp_path):
    log_path = tmp_path / "logs" / "rank0.log"
    console = recording_console()
    with TeeView(LiveView(INFO, console=console), PlainLog(INFO, path=log_path)) as view:
        view.on_step(fake_record(1), logged=True)
        view.on_step(fake_record(2), logged=False)
    lines = log_path.read_text().splitlines()
    assert len(lines) == 2 and lines[1].startswith("step 1/100")
    assert "1/100" in console.export_text()
