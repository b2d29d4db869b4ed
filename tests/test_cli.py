"""The ``peft-mmap`` CLI end to end on a generated image-folder dataset and a tiny local CLIP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CLOSED_PORT_ENDPOINT, hub_env, unanswered_hub
from conftest import WORKSPACE_TASKS as TASKS

from peft_mmap.apps.cli import BEST, SUBCOMMANDS, build_parser, main, num_groups_for, train_summary
from peft_mmap.base_models import TINY_CLIP_NAME
from peft_mmap.data import few_shot_split, save_split, scan_image_folder
from peft_mmap.manifest import MANIFEST_NAME
from peft_mmap.train import TrainResult
from peft_mmap.train_config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft")


def run_python(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -W error <args>`` in a fresh process that imports this checkout, offline."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run(
        [sys.executable, "-W", "error", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def data_args(root) -> list[str]:
    return ["--data", str(root / "data"), "--shots", "2", "--seed", "1", "--split-file", str(root / "split.json"),
            "--device", "cpu"]  # fmt: skip


def common(root) -> list[str]:
    return [
        "--model",
        str(root / "model"),
        *data_args(root),
        "--prompt-length",
        "2",
        "--source-shape",
        "1",
        "8",
    ]


def test_group_train_eval_end_to_end(workspace, capsys):
    root = workspace
    quick = ["--epochs", "1", "--batch-size", "2", "--max-steps", "2"]
    assert (
        main(
            [
                "group",
                *common(root),
                *quick,
                "--output",
                str(root / "grouping"),
                "--snapshots",
                "2",
            ]
        )
        == 0
    )
    groups = json.loads((root / "grouping" / "groups.json").read_text())["groups"]
    assert sorted(t for g in groups for t in g) == sorted(TASKS) and len(groups) == 2  # the default number
    affinity = json.loads((root / "grouping" / "affinity.json").read_text())
    assert affinity["task_names"] == list(TASKS) and len(affinity["matrix"]) == 3
    assert (root / "grouping" / "affinity.png").is_file() and (root / "split.json").is_file()

    run = root / "run"
    train_args = [
        "train",
        *common(root),
        *quick,
        "--groups",
        str(root / "grouping" / "groups.json"),
        "--output",
        str(run),
    ]
    capsys.readouterr()
    assert main(train_args) == 0
    manifest = json.loads((run / "adapters" / MANIFEST_NAME).read_text())
    assert manifest["groups"] == groups and (run / "checkpoint" / "trainer_state.json").is_file()
    summary = capsys.readouterr().out
    assert "trained 2 steps in" in summary and f"adapters: {run / 'adapters'}" in summary
    assert main([*train_args[:-2], "--output", str(run), "--resume"]) == 0
    assert "nothing to train: the checkpoint already holds all 2 steps." in capsys.readouterr().out

    assert main(["eval", *data_args(root), "--adapters", str(run), "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["Task", "zeroshot", "mmap"]  # zero-shot next to the adapters
    assert "± 0.0" not in out and "mmap vs zero-shot:" in out and "art" in out
    results = json.loads((run / "adapters" / "results.json").read_text())
    entry = results["methods"]["mmap"]
    assert set(entry["tasks"]) == set(TASKS) and 0 <= entry["average"] <= 100
    assert entry["trainable_params"] > 0 and results["grouping"] == groups and results["seeds"] == [1]
    zero_shot = results["methods"]["zeroshot"]
    assert set(zero_shot["tasks"]) == set(TASKS) and zero_shot["trainable_params"] == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--epochs", "0"], "expected a positive integer, got '0'"),
        (["train", "--fraction", "1.5"], "expected a number strictly between 0 and 1, got '1.5'"),
        (["train", "--layout", "mnist"], "invalid choice: 'mnist'"),
        (["eval", "--batch-size", "x"], "expected a positive integer, got 'x'"),
        (["group", "--num-groups", "many"], "expected a positive integer or 'best', got 'many'"),
    ],
)
def test_bad_values_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_library_errors_become_usage_errors(workspace, tmp_path, capsys):
    argv = ["train", *common(workspace), "--groups-inline", "art;nope", "--output", str(tmp_path / "r")]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and "unknown tasks ['nope']" in capsys.readouterr().err


def test_every_option_is_documented():
    parser = build_parser()
    assert {"group", "train", "eval", "bench", "params"} <= {c.name for c in SUBCOMMANDS}
    subparsers = next(a for a in parser._actions if a.choices and "train" in a.choices).choices
    for name, sub in subparsers.items():
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings} has no help"


def test_bench_subcommand_writes_tables(workspace, tmp_path, capsys):
    argv = ["bench", "--model", str(workspace / "model"), "--data", str(workspace / "data"), "--shots", "2",
            "--device", "cpu", "--methods", "zeroshot", "mmap_task_only", "--seeds", "1", "--epochs", "1",
            "--batch-size", "4", "--max-steps", "1", "--prompt-length", "2", "--source-shape", "1", "8",
            "--output", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["methods"]) == {"zeroshot", "mmap_task_only"}
    assert "Parameters" in (tmp_path / "results.md").read_text()
    with pytest.raises(SystemExit) as exit_info:
        main([*argv[:-2], "--methods", "nope", "--output", str(tmp_path)])
    assert exit_info.value.code == 2
    search = tmp_path / "search"
    assert main([*argv[:-2], "--methods", "zeroshot", "--lr-search", "0.5", "1", "--validation-shots", "1",
                 "--output", str(search)]) == 0  # fmt: skip
    assert json.loads((search / "lr_search.json").read_text())["picked"] == {"zeroshot": 1.0}
    assert "wrote" in capsys.readouterr().out and (search / "results.json").is_file()


def test_help_imports_no_heavy_module_and_prints_nothing_on_stderr():
    """``--help`` of the CLI and of every command answers without importing torch, transformers or peft."""
    driver = (
        "import sys\n"
        "from peft_mmap.apps.cli import SUBCOMMANDS, main\n"
        "for argv in [['--help'], *([c.name, '--help'] for c in SUBCOMMANDS)]:\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as stop:\n"
        "        assert stop.code == 0, (argv, stop.code)\n"
        "print('MODULES', *sorted(sys.modules))\n"
    )
    result = run_python("-c", driver)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    modules = result.stdout.rsplit("MODULES", 1)[1].split()
    assert not [m for m in modules if m.split(".")[0] in HEAVY]
    assert result.stdout.count("usage: peft-mmap") == len(SUBCOMMANDS) + 1


def test_train_and_eval_print_no_warnings(workspace, tmp_path):
    """One fresh process, warnings as errors: no Python warning and no transformers/peft warning in the log."""
    data = f"--data {workspace / 'data'} --shots 2 --split-file {tmp_path / 'split.json'} --device cpu"
    train = f"train --model {workspace / 'model'} {data} --prompt-length 2 --source-shape 1 8 --epochs 1 " \
        f"--batch-size 2 --max-steps 1 --output {tmp_path / 'run'}"  # fmt: skip
    evaluation = f"eval {data} --adapters {tmp_path / 'run'}"
    driver = f"from peft_mmap.apps.cli import main\nmain({train.split()!r})\nmain({evaluation.split()!r})\n"
    result = run_python("-c", driver)
    assert result.returncode == 0, result.stderr
    log = result.stderr.lower()  # progress bars only
    assert "warn" not in log and "deprecat" not in log and "[transformers]" not in log, result.stderr
    assert "first loss" in result.stdout and "zeroshot" in result.stdout


def early_refusals(root: Path, out: Path) -> dict[str, list[str]]:
    model, data = root / "model", root / "data"
    train = f"train --model {model} --data {data} --shots 2 --split-file {out / 'split.json'} --output"
    return {
        case: argv.split()
        for case, argv in {
            "--model /no/such/dir": train.replace(str(model), "/no/such/dir") + f" {out / 'run'}",
            "--num-groups 3 with 2 tasks": f"group --model {model} --data {data} --tasks art,clipart --shots 2 "
            f"--num-groups 3 --split-file {out / 'split.json'} --output {out / 'grouping'}",
            "bench --num-groups 4 with 3 tasks": f"bench --model {model} --data {data} --shots 2 --num-groups 4 "
            f"--output {out}",
            "bench --lr-search with --sweep-shots": f"bench --model {model} --data {data} --sweep-shots 1 2 "
            f"--lr-search --output {out}",
            "--layout officehome on other data": f"{train} {out / 'run'} --layout officehome --tasks art,clipart",
            "--layout officehome with a split file": f"eval --data {data} --layout officehome --split-file "
            f"{out / 'existing.json'} --adapters {out / 'run'}",
            "existing checkpoint without --resume": f"{train} {out / 'done'}",
            "--epoch 2 (no abbreviations)": f"{train} {out / 'run'} --epoch 2",
            "--no-task-adapters without groups": f"{train} {out / 'run'} --no-task-adapters",
        }.items()
    }


REFUSALS = {
    "--model /no/such/dir": "'/no/such/dir' is not a local folder, not 'peft_mmap:tiny-clip' and not a hub id of "
    "the form org/name",
    "--num-groups 3 with 2 tasks": "--num-groups 3 asks for more groups than there are tasks (2)",
    "bench --num-groups 4 with 3 tasks": "--num-groups 4 asks for more groups than there are tasks (3)",
    "bench --lr-search with --sweep-shots": "--lr-search and --sweep-shots cannot be combined",
    "--layout officehome on other data": "has classes that are not Office-Home classes",
    "--layout officehome with a split file": "has classes that are not Office-Home classes",
    "existing checkpoint without --resume": "already holds a training checkpoint; pass --resume",
    "--epoch 2 (no abbreviations)": "unrecognized arguments: --epoch 2",
    "--no-task-adapters without groups": "--no-task-adapters leaves no adapter to train",
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_early_refusals_write_nothing(case, workspace, tmp_path, capsys):
    splits = few_shot_split(scan_image_folder(workspace / "data"), shots=2)
    save_split(splits, tmp_path / "existing.json", workspace / "data")
    (tmp_path / "done" / "checkpoint").mkdir(parents=True)
    (tmp_path / "done" / "checkpoint" / "trainer_state.json").write_text("{}")
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        main(early_refusals(workspace, tmp_path)[case])
    assert exit_info.value.code == 2 and REFUSALS[case] in capsys.readouterr().err
    assert sorted(tmp_path.rglob("*")) == before


def test_one_default_number_of_groups():
    assert num_groups_for(None, 4) == 2 and num_groups_for(None, 1) == 1
    assert num_groups_for(3, 4) == 3 and num_groups_for(BEST, 4) is None
    with pytest.raises(ValueError, match="--num-groups 5 asks for more groups than there are tasks"):
        num_groups_for(5, 4)
    parser = build_parser()
    for command in ("group", "bench"):
        args = parser.parse_args([command, "--model", "org/name", "--data", "d", "--output", "o"])
        assert args.num_groups is None  # both resolve through num_groups_for


def test_mmap_options_match_the_config_fields():
    import dataclasses

    from peft_mmap.apps.cli import mmap_config
    from peft_mmap.config import MmAPConfig
    from peft_mmap.options import MMAP_CLI_FIELDS

    fields = {f.name: f for f in dataclasses.fields(MmAPConfig)}
    parser = build_parser()
    train = next(a for a in parser._actions if a.choices and "train" in a.choices).choices["train"]
    options = {a.dest: a for a in train._actions}
    for name, (default, text) in MMAP_CLI_FIELDS.items():
        assert fields[name].metadata["help"].startswith(text), name
        assert options[name].help.startswith(text), name
        expected = list(default) if isinstance(default, tuple) else default
        assert getattr(MmAPConfig(), name) == expected == options[name].default, name
    base = ["train", "--model", "org/name", "--data", "d", "--output", "o"]
    assert mmap_config(parser.parse_args(base)).to_dict() == MmAPConfig().to_dict()  # same defaults
    args = parser.parse_args([*base, "--prompt-length", "6", "--source-shape", "3", "16", "--depth", "2"])
    assert (mmap_config(args).prompt_length, mmap_config(args).source_shape, mmap_config(args).depth) == (
        6,
        [3, 16],
        2,
    )
    assert mmap_config(parser.parse_args([*base, "--scale-init", "ones"])).scale_init == "ones"
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--scale-init", "uniform"])


def test_bench_augment_flag_reaches_the_spec():
    from peft_mmap.apps.cli import bench_spec

    parser = build_parser()
    base = ["bench", "--model", "org/name", "--data", "d", "--output", "o", "--shots", "2"]
    for flags, expected in (([], None), (["--augment"], True), (["--no-augment"], False)):
        assert bench_spec(parser.parse_args([*base, *flags]), 4).augment is expected, flags


def test_train_summary_names_losses_time_and_adapters(tmp_path):
    history = [{"art": 1.5, "clipart": 2.25}, {"art": 1.0, "clipart": 2.0}]
    text = train_summary(TrainResult(4, 2, history, None, 3.25), tmp_path / "run" / "adapters")
    lines = text.splitlines()
    assert lines[0] == "trained 2 steps in 3.2 s (4 steps and 2 complete epochs in all)"
    assert lines[1].split() == ["task", "first", "loss", "last", "loss"]
    assert lines[2].split() == ["art", "1.5000", "1.0000"]
    assert lines[3].split() == ["clipart", "2.2500", "2.0000"]
    assert lines[-1].startswith(f"adapters: {tmp_path / 'run' / 'adapters'}")


UNREACHABLE = "someorg/no-such-model: no network: the Hugging Face Hub"
MODEL_COMMANDS = ("train", "group", "eval", "bench", "demo")


def hub_model_argv(command: str, root: Path, out: Path) -> list[str]:
    """``command`` with ``--model someorg/no-such-model`` and otherwise valid arguments."""
    data = ["--data", str(root / "data"), "--shots", "2"]
    rest = {
        "train": [*data, "--output", str(out / "run")],
        "group": [*data, "--output", str(out / "grouping")],
        "eval": [*data, "--split-file", str(out / "split.json"), "--adapters", str(out / "run")],
        "bench": [*data, "--output", str(out / "bench")],
        "demo": ["--output", str(out / "demo")],
    }[command]
    return [command, "--model", "someorg/no-such-model", *rest]


def run_cli_with_hub(argv: list[str], endpoint: str, hf_home: Path) -> subprocess.CompletedProcess:
    """The CLI in a fresh process whose Hub is ``endpoint`` (``HF_HUB_OFFLINE`` unset, empty cache)."""
    return subprocess.run(
        [sys.executable, "-m", "peft_mmap.apps.cli", *argv],
        capture_output=True,
        text=True,
        env=hub_env(endpoint, hf_home),
        timeout=600,
    )


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_a_hub_id_the_hub_cannot_be_reached_for_is_a_usage_error(command, workspace, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    result = run_cli_with_hub(hub_model_argv(command, workspace, out), CLOSED_PORT_ENDPOINT, tmp_path / "hf")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert (
        len(errors) == 1 and f"error: argument --model: {UNREACHABLE} ({CLOSED_PORT_ENDPOINT})" in errors[0]
    )
    assert "a local folder" in errors[0] and "HF_HUB_OFFLINE=1" in errors[0]
    assert not list(out.iterdir())


def test_train_asks_a_hub_that_does_not_answer_once_and_does_not_retry(workspace, tmp_path):
    with unanswered_hub() as (endpoint, requests):
        result = run_cli_with_hub(hub_model_argv("train", workspace, tmp_path), endpoint, tmp_path / "hf")
        repo_requests = [line for line in requests() if "someorg/no-such-model" in line]
    assert result.returncode == 2 and UNREACHABLE in result.stderr, result.stderr
    assert repo_requests == ["HEAD /someorg/no-such-model/resolve/main/config.json"]


def test_the_shipped_tiny_clip_by_its_portable_name_and_eval_without_model(workspace, tmp_path, capsys):
    run = tmp_path / "run"
    data = ["--data", str(workspace / "data"), "--shots", "2", "--split-file", str(tmp_path / "split.json")]
    train = ["train", "--model", TINY_CLIP_NAME, *data, "--epochs", "1", "--batch-size", "2", "--max-steps", "1",
             "--groups-inline", "art,clipart;product", "--device", "cpu", "--output", str(run)]  # fmt: skip
    assert main(train) == 0
    manifest = json.loads((run / "adapters" / MANIFEST_NAME).read_text())
    assert manifest["base_model"] == TINY_CLIP_NAME
    for name in manifest["adapters"]:
        config = json.loads((run / "adapters" / name / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == TINY_CLIP_NAME
    capsys.readouterr()
    assert main(["eval", *data, "--adapters", str(run), "--device", "cpu"]) == 0  # the base from the manifest
    assert "mmap vs zero-shot:" in capsys.readouterr().out


def test_preset_gives_bench_group_and_train_its_defaults_and_explicit_options_win():
    from peft_mmap.apps.bench import preset_spec
    from peft_mmap.apps.cli import DEFAULT_BENCH_METHODS, bench_spec, mmap_config, parse_args, train_config

    parser = build_parser()
    for command in ("bench", "group", "train"):
        base = [command, "--model", "org/name", "--data", "d", "--output", "o", "--preset", "paper"]
        for layout, batch in (("officehome", 16), ("domainnet", 4)):
            config = train_config(parse_args(parser, [*base, "--layout", layout]))
            assert (config.batch_size, config.lr, config.warmup_epochs, config.augment) == (
                batch,
                0.0035,
                1,
                True,
            )
            assert mmap_config(parse_args(parser, [*base, "--layout", layout])).prompt_length == 22
        # An explicit option wins, also when it equals the default without the preset (--warmup-epochs 0).
        args = parse_args(parser, [*base, "--layout", "officehome", "--warmup-epochs", "0", "--batch-size", "2",
                                   "--prompt-length", "4"])  # fmt: skip
        assert (train_config(args).warmup_epochs, train_config(args).batch_size) == (0, 2)
        assert mmap_config(args).prompt_length == 4
        plain = train_config(parse_args(parser, base[:-2]))  # no preset: today's defaults
        assert plain == TrainConfig() and mmap_config(parse_args(parser, base[:-2])).prompt_length == 4
    bench = ["bench", "--model", "org/name", "--data", "d", "--output", "o", "--fraction", "0.1"]
    spec = bench_spec(parse_args(parser, [*bench, "--preset", "paper", "--layout", "officehome"]), 4)
    python = preset_spec("paper", "officehome", list(DEFAULT_BENCH_METHODS), fraction=0.1)
    assert spec.settings() == python.settings() and spec.augment is None  # the CLI and Python agree
    assert (spec.preset, spec.protocol, spec.seeds, spec.method_options["coop_mt"]) == ("paper", "paper", [1, 2, 3],
                                                                                        {"n_ctx": 20})  # fmt: skip
    spec = bench_spec(parse_args(parser, [*bench, "--preset", "paper", "--layout", "officehome", "--seeds", "4",
                                          "--protocol", "recipes", "--no-augment"]), 4)  # fmt: skip
    assert spec.preset_record()["overrides"] == {
        "train.augment": {"preset": True, "used": False},
        "bench.seeds": {"preset": [1, 2, 3], "used": [4]},
        "bench.protocol": {"preset": "paper", "used": "recipes"},
    }
    assert bench_spec(parse_args(parser, bench), 4).preset is None


def test_preset_refusals_name_the_way_out(workspace, tmp_path, capsys):
    from peft_mmap.apps.cli import bench_spec, parse_args

    generic = (
        "sets the batch size per dataset layout: officehome (16), domainnet (4); for layout 'generic' give "
    )
    for command in ("bench", "train"):
        argv = [command, "--model", str(workspace / "model"), "--data", str(workspace / "data"), "--shots", "2",
                "--preset", "paper", "--output", str(tmp_path / "out")]  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2 and f"{generic}--batch-size explicitly" in capsys.readouterr().err
        assert not (tmp_path / "out").exists()
    splits = "preset 'paper' on officehome: --fraction 0.1 or 0.2, or --shots 6 or 12"
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--model", str(workspace / "model"), "--data", str(tmp_path), "--layout", "officehome",
              "--preset", "paper", "--output", str(tmp_path / "out")])  # fmt: skip
    assert exit_info.value.code == 2 and splits in capsys.readouterr().err
    bench = ["bench", "--model", "org/name", "--data", "d", "--output", "o", "--preset", "paper"]
    with pytest.raises(ValueError, match=splits):
        bench_spec(parse_args(build_parser(), [*bench, "--layout", "officehome"]), 4)


def test_preset_runs_record_the_preset_and_the_sizes(workspace, tmp_path):
    quick = ["--preset", "paper", "--batch-size", "2", "--max-steps", "1", "--epochs", "2", "--device", "cpu"]
    data = ["--model", str(workspace / "model"), "--data", str(workspace / "data"), "--shots", "2"]
    assert main(["bench", *data, *quick, "--methods", "zeroshot", "mmap_task_only", "vpt_mt", "--seeds", "1",
                 "--output", str(tmp_path / "bench")]) == 0  # fmt: skip
    results = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert results["preset"] == {"name": "paper", "layout": "generic", "overrides": {
        "train.epochs": {"preset": 5, "used": 2}, "bench.seeds": {"preset": [1, 2, 3], "used": [1]}}}  # fmt: skip
    assert results["sizes"]["mmap_task_only"] == {"config": {"prompt_length": 22, "source_shape": [2, 8],
                                                             "depth": None}}  # fmt: skip
    assert results["sizes"]["vpt_mt"] == {"prompt_length": 18}
    assert results["methods"]["vpt_mt"]["recipe"]["train"]["warmup_epochs"] == 1
    assert main(["group", *data, *quick, "--snapshots", "1", "--output", str(tmp_path / "group")]) == 0
    assert json.loads((tmp_path / "group" / "groups.json").read_text())["preset"]["name"] == "paper"
    assert main(["train", *data, *quick, "--groups-inline", "art;clipart,product", "--lr", "0.01",
                 "--output", str(tmp_path / "run")]) == 0  # fmt: skip
    record = json.loads((tmp_path / "run" / "preset.json").read_text())
    assert record["name"] == "paper" and record["sizes"] == {"mmap": {"prompt_length": 22, "source_shape": [2, 8],
                                                                      "depth": None}}  # fmt: skip
    assert record["overrides"]["train.lr"] == {"preset": 0.0035, "used": 0.01} and record["train"]["augment"]
