"""Checks that refuse a bad command line or job before any worker starts, and ``sarl serve``'s exit."""

from __future__ import annotations

from pathlib import Path

import pytest

from sarl.cli import build_parser, parse_args
from sarl.model.config import ConfigError
from sarl.model.data.build import check_options, dataset_options
from sarl.platform.job import load_job
from sarl.platform.tune import load_sweep

DEMO = Path(__file__).resolve().parents[3] / "jobs" / "demo.yaml"


@pytest.mark.parametrize("argv, overrides", [
    (["train", "--config", "J", "--json", "a=b"], ["a=b"]),
    (["train", "a=1", "--json", "b=2", "--config", "J", "c=3"], ["a=1", "b=2", "c=3"]),
    (["tune", "--config", "S", "num_samples=2", "--address", "x", "max_concurrent_trials=1"],
     ["num_samples=2", "max_concurrent_trials=1"]),
    (["protocol", "--in-process", "train.epochs=1", "--output-dir", "o", "data.kind=synthetic"],
     ["train.epochs=1", "data.kind=synthetic"]),
    (["demo", "--no-serve", "train.epochs=1"], ["train.epochs=1"]),
])
def test_overrides_may_follow_flags(argv: list[str], overrides: list[str]) -> None:
    args = parse_args(build_parser(), argv)
    assert args.overrides == overrides


@pytest.mark.parametrize("argv", [
    ["train", "--config", "J", "--jsn", "a=b"],  # a mistyped flag is still an error
    ["train", "a=1", "--json", "notanoverride"],
    ["evaluate", "--checkpoint", "c", "a=b"],  # evaluate takes no overrides
])
def test_other_leftover_arguments_are_refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(build_parser(), argv)
    assert "unrecognized arguments" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n"])
def test_an_empty_job_file_is_an_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"job file {path} is empty"):
        load_job(path)


def test_an_empty_sweep_file_is_an_error(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match=rf"sweep file {sweep} is empty"):
        load_sweep(sweep)
    job = tmp_path / "job.yaml"
    job.write_text("")
    sweep.write_text(f"job: {job}\nspace:\n  loss.name: {{choice: [asl, focal]}}\n")
    with pytest.raises(ConfigError, match=rf"job file {job} is empty"):
        load_sweep(sweep)


def test_dataset_options_come_from_the_builders() -> None:
    assert {"annotation_file", "image_dir", "year"} <= set(dataset_options("coco"))
    assert {"num_images", "seed", "image_size", "num_classes"} <= set(dataset_options("synthetic"))
    assert "transform" not in dataset_options("synthetic") and "root" not in dataset_options("voc")
    check_options("synthetic", {"num_images": 8, "seed": 1})
    with pytest.raises(ValueError, match="unknown dataset kind"):
        dataset_options("imagenet")


def test_an_option_the_kind_does_not_take_fails_when_the_job_is_loaded(tmp_path: Path) -> None:
    path = tmp_path / "coco.yaml"
    path.write_text("data:\n  kind: coco\n  root: /data/coco\n  options:\n    num_images: 10\n    year: '2014'\n")
    with pytest.raises(ConfigError, match=r"'num_images'.*'coco'.*annotation_file, image_dir, include_empty, year"):
        load_job(path)
    with pytest.raises(ConfigError, match="'imgs'"):
        load_job(DEMO, ["data.options.imgs=3"])
    assert load_job(DEMO, ["data.options.num_images=12"]).data.options["num_images"] == 12


def test_a_sweep_whose_job_has_a_wrong_option_is_refused(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(DEMO.read_text())
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"job: {job}\noverrides:\n  data.options.annotation_file: x.json\n"
                     "space:\n  loss.name: {choice: [asl, focal]}\n")
    with pytest.raises(ConfigError, match="annotation_file"):
        load_sweep(sweep)


def test_serve_ctrl_c_or_sigterm_deletes_only_its_own_application(monkeypatch: pytest.MonkeyPatch) -> None:
    """``sarl serve`` until Ctrl-C or SIGTERM (docker stop, Kubernetes), both real signals sent to this process
    once the app is up: only its own application is deleted (on a shared cluster serve.shutdown() would stop every
    app), and the SIGTERM handler is put back."""
    import os
    import signal
    import threading

    from sarl.platform import cluster
    from sarl.platform.serve import deployment as serve_module

    calls: list[tuple[str, ...]] = []

    class FakeServe:
        def delete(self, name: str) -> None:
            calls.append(("delete", name))

        def shutdown(self) -> None:
            calls.append(("shutdown",))

    def deployed_then(signum: int):
        def deploy(args, config=None) -> str:  # the signal comes while serve_forever waits
            threading.Timer(0.3, os.kill, (os.getpid(), signum)).start()
            return "http://127.0.0.1:8000"
        return deploy

    monkeypatch.setattr(cluster, "init_ray", lambda address=None: None)
    monkeypatch.setattr(serve_module, "serve", FakeServe())
    sigint, sigterm = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C as in a fresh process
    try:
        monkeypatch.setattr(serve_module, "deploy", deployed_then(signal.SIGINT))
        serve_module.serve_forever({"checkpoint": "x"}, serve_module.ServeConfig(name="sarl-team-a"),
                                   address="ray://shared:10001")
        assert calls == [("delete", "sarl-team-a")]
        calls.clear()
        monkeypatch.setattr(serve_module, "deploy", deployed_then(signal.SIGTERM))
        serve_module.serve_forever({"checkpoint": "x"})
        assert calls == [("delete", serve_module.APP_NAME)]
        assert signal.getsignal(signal.SIGTERM) is sigterm
    finally:
        signal.signal(signal.SIGINT, sigint)
