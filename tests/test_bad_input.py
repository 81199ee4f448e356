"""Bad input fails before any training: exit code 2 and one line naming the file, key or row."""

from __future__ import annotations

import pytest

from tests.conftest import run_cli, tiny_config, write

GOOD_CSV = "text,label\n" + "".join(f"good text {i},pos\nbad text {i},neg\n" for i in range(10))


def _case(tmp_path, yaml_file, *, cfg_over=None, files=None, raw_yaml=None, extra_args=()):
    for name, content in (files or {}).items():
        write(tmp_path / name, content)
    train = tmp_path / "train.csv"
    if not train.exists():
        write(train, GOOD_CSV)
    if raw_yaml is not None:
        cfg_path = write(tmp_path / "bad.yaml", raw_yaml)
    else:
        cfg = tiny_config(train)
        for k, v in (cfg_over or {}).items():
            node = cfg
            parts = k.split(".")
            for p in parts[:-1]:
                node = node.setdefault(p, {})
            if v is _DELETE:
                node.pop(parts[-1], None)
            else:
                node[parts[-1]] = v
        cfg_path = yaml_file(cfg)
    return ["train", cfg_path, "--output", tmp_path / "out", *extra_args]


_DELETE = object()

CASES = [
    # (id, case kwargs, expected fragment of the message)
    ("unknown-top-key", dict(cfg_over={"modle": "x"}), "modle: unknown key"),
    ("unknown-nested-key-suggests", dict(cfg_over={"training.learning_rat": 0.1}), "did you mean 'learning_rate'"),
    ("wrong-type", dict(cfg_over={"training.epochs": "many"}), "training.epochs"),
    ("negative-lr", dict(cfg_over={"training.learning_rate": -1}), "training.learning_rate"),
    ("bad-approach", dict(cfg_over={"approach": "regression"}), "approach"),
    ("bad-quantization", dict(cfg_over={"quantization": "fp3"}), "quantization"),
    ("template-without-text", dict(cfg_over={"generation.prompt_template": "Label:"}), "generation.prompt_template"),
    ("template-unknown-slot", dict(cfg_over={"generation.prompt_template": "{text} {foo}"}), "generation.prompt_template"),
    ("missing-train-key", dict(cfg_over={"data.train": _DELETE}), "data.train: required key is missing"),
    ("yaml-syntax", dict(raw_yaml="model: [unclosed\n"), "invalid YAML"),
    ("yaml-not-mapping", dict(raw_yaml="- a\n- b\n"), "top level must be a mapping"),
    ("missing-data-file", dict(cfg_over={"data.train": "/nonexistent/train.csv"}), "/nonexistent/train.csv: data file not found"),
    ("missing-text-column", dict(cfg_over={"data.text_column": "sentence"}), "no text column 'sentence'"),
    ("missing-label-column", dict(cfg_over={"data.label_column": "y"}), "no label column 'y'"),
    ("empty-text-row", dict(files={"train.csv": GOOD_CSV + '"   ",pos\n'}), "row 21: empty text"),
    ("missing-label-row", dict(files={"train.csv": GOOD_CSV + "some text,\n"}), "row 21: missing label"),
    ("one-class", dict(files={"train.csv": "text,label\n" + "".join(f"t {i},pos\n" for i in range(20))}), "fewer than two classes"),
    ("unseen-eval-label", dict(files={"eval.csv": "text,label\nhello,pos\nodd one,maybe\n"},
                               cfg_over={"data.eval": "eval.csv"}), "row 2: label 'maybe' is not among the training labels"),
    ("non-utf8", dict(files={"train.csv": GOOD_CSV.encode() + "caf\u00e9,pos\n".encode("latin-1")}), "not UTF-8 text (line 22"),
    ("empty-file", dict(files={"train.csv": ""}), "file is empty"),
    ("unknown-format", dict(files={"train.xlsx": "x"}, cfg_over={"data.train": "train.xlsx"}), "unknown format '.xlsx'"),
    ("huge-text", dict(files={"train.csv": GOOD_CSV + "x" * 2000 + ",pos\n"}, cfg_over={"data.max_text_chars": 1000}), "exceeds data.max_text_chars"),
    ("bad-jsonl", dict(files={"train.jsonl": '{"text": "a", "label": "x"}\n{oops\n'}, cfg_over={"data.train": "train.jsonl"}), "line 2: invalid JSON"),
    ("label-name-out-of-range", dict(files={"train.csv": "text,label\na,0\nb,1\nc,5\n"},
                                     cfg_over={"data.label_names": ["x", "y"]}), "row 3: label 5 outside data.label_names"),
    ("unknown-model-folder", dict(cfg_over={"model": "./no/such/model"}), "no such folder"),
    ("model-folder-without-config", dict(files={"m/readme.txt": "x"}, cfg_over={"model": "./m"}), "has no config.json"),
    ("max-length-too-small", dict(cfg_over={"approach": "generation", "training.max_length": 8,
                                            "generation.prompt_template": "Classify this text please: {text} Answer:"}),
     "training.max_length"),
    ("paged-optimizer-on-cpu", dict(cfg_over={"training.optimizer": "paged_adamw_8bit"}), "needs a CUDA GPU"),
    ("liger-on-cpu", dict(cfg_over={"training.liger_kernel": True}), "training.liger_kernel: true needs a CUDA GPU"),
    ("liger-with-compile", dict(cfg_over={"training.liger_kernel": True, "training.compile": True}),
     "liger_kernel and compile cannot be combined"),
    ("bad-target-modules", dict(cfg_over={"lora.target_modules": ["no_such_proj"]}), "lora.target_modules"),
    ("graphs-with-accumulation", dict(cfg_over={"training.cuda_graphs": True, "training.grad_accum": 2}),
     "training: cuda_graphs: true needs grad_accum 1"),
    ("bad-set-syntax", dict(extra_args=("--set", "training.epochs")), "expected KEY=VALUE"),
    ("bad-set-value", dict(extra_args=("--set", "training.batch_size=0")), "training.batch_size"),
]


@pytest.mark.parametrize("case,expect", [(c[1], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line(tmp_path, yaml_file, cli, case, expect):
    args = _case(tmp_path, yaml_file, **case)
    code, out, err = cli(*args)
    assert code == 2, (out, err)
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert expect in lines[0], lines[0]
    assert not (tmp_path / "out").exists(), "nothing may be written on bad input"


def test_config_file_missing(cli, tmp_path):
    code, _, err = cli("train", tmp_path / "nope.yaml")
    assert code == 2 and "nope.yaml: config file not found" in err


def test_relative_data_paths_resolve_against_the_config_file(tmp_path, yaml_file, cli):
    sub = tmp_path / "cfgs"
    write(sub / "data.csv", "text,label\n")  # header only: proves the file *was* found relative to cfgs/
    cfg = yaml_file(tiny_config("data.csv"), name="cfgs/run.yaml")
    code, _, err = cli("train", cfg)
    assert code == 2 and str(sub / "data.csv") in err and "no rows" in err


def test_predict_usage_errors(cli, tmp_path):
    code, _, err = cli("predict", "--model", tmp_path, "--text", "x")
    assert code == 2 and f"{tmp_path}: not a qlora-tune model folder" in err
    code, _, err = cli("predict", "--model", tmp_path)
    assert code == 2 and "either --text" in err
    code, _, err = cli("predict", "--model", tmp_path / "nope", "--text", "hi")
    assert code == 2 and "no such folder" in err


def test_real_process_exit_code(tmp_path):
    """The same path through a real process: the exit status is 2 and stderr is one line."""
    p = run_cli("train", tmp_path / "missing.yaml")
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().count("\n") == 0 and "config file not found" in p.stderr


@pytest.mark.parametrize("args,expect", [
    (["predict"], "Missing option '--model'"),
    (["no-such-command"], "No such command"),
    (["train", "--bogus"], "No such option: --bogus"),
    (["status", "no-such-study"], "study 'no-such-study': not found"),
    (["resume", "no-such-study"], "study 'no-such-study': not found"),
    (["promote", "no-such-study"], "study 'no-such-study': not found"),
    (["run", "x.yaml", "--name", "bad name!"], "x.yaml: config file not found"),
    (["predict", "-m", "m", "--input", "in.csv", "--output", "o.csv", "--via-serve"], "--via-serve needs --address"),
    (["predict", "-m", "m", "--input", "in.csv", "--output", "o.csv", "--address", "auto", "--via-serve",
      "--gpus-per-worker", "0.5"], "--gpus-per-worker does not apply with --via-serve"),
])
def test_cli_misuse_exits_2(cli, args, expect):
    code, out, err = cli(*args)
    assert code == 2, (out, err)
    assert expect in err and len(err.strip().splitlines()) == 1, err
