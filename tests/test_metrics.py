"""Metric parsing over real-format output samples, totals from arguments, and the analyses."""

from __future__ import annotations

import math

import pytest

from trainctl import metrics
from trainctl.errors import ConfigError, TrainctlWarning
from trainctl.metrics import MetricParser, infer_totals

from .conftest import run_cli

NAN = float("nan")
INF = float("inf")

# (line, step, epoch, values, extra totals) -- each line parsed by a fresh parser
MATCHES = [
    ("loss: 0.123", None, None, {"loss": 0.123}, {}),
    ("loss=0.123", None, None, {"loss": 0.123}, {}),
    ("Epoch 3/10", None, 3, {}, {"total_epochs": 10}),
    ("epoch 3", None, 3, {}, {}),
    ("step 100/1000", 100, None, {}, {"total_steps": 1000}),
    # nanoGPT
    ("iter 100: loss 2.3045, time 45.21ms, mfu 12.30%", 100, None, {"loss": 2.3045}, {}),
    ("step 250: train loss 1.9012, val loss 2.0100", 250, None,
     {"train_loss": 1.9012, "val_loss": 2.01}, {}),
    # Keras
    ("loss: 0.31 - accuracy: 0.90", None, None, {"loss": 0.31, "accuracy": 0.90}, {}),
    ("1875/1875 [==============================] - 3s 2ms/step - loss: 0.2950 - accuracy: 0.9145"
     " - val_loss: 0.1400 - val_accuracy: 0.9580", None, None,
     {"loss": 0.295, "accuracy": 0.9145, "val_loss": 0.14, "val_accuracy": 0.958}, {}),
    ("1875/1875 ━━━━━━━━━━━━━━━━━━━━ 2s 1ms/step - accuracy: 0.8785 - loss: 0.4230", None, None,
     {"accuracy": 0.8785, "loss": 0.423}, {}),
    # Hugging Face Trainer
    ("{'loss': 0.5, 'learning_rate': 5e-05, 'epoch': 1.0}", None, 1,
     {"loss": 0.5, "learning_rate": 5e-05}, {}),
    ("{'loss': 0.6931, 'grad_norm': 1.25, 'learning_rate': 4.5e-05, 'epoch': 0.25}", None, 0.25,
     {"loss": 0.6931, "grad_norm": 1.25, "learning_rate": 4.5e-05}, {}),
    ("{'eval_loss': 0.41, 'eval_runtime': 1.2, 'eval_samples_per_second': 100.5, 'epoch': 2.0}",
     None, 2, {"eval_loss": 0.41, "eval_runtime": 1.2, "eval_samples_per_second": 100.5}, {}),
    ('{"loss": 0.25, "step": 40}', 40, None, {"loss": 0.25}, {}),
    # PyTorch examples (mnist)
    ("Train Epoch: 1 [640/60000 (1%)]\tLoss: 2.282550", None, 1, {"loss": 2.28255}, {}),
    ("Test set: Average loss: 0.0467, Accuracy: 9849/10000 (98%)", None, None,
     {"test_loss": 0.0467, "test_accuracy": 0.9849}, {}),
    ("Epoch [3/10], Step [100/600], Loss: 0.2034", 100, 3, {"loss": 0.2034},
     {"total_epochs": 10, "total_steps": 600}),
    # Lightning progress bar, including a redraw with \r
    ("Epoch 1: 100%|██████████| 32/32 [00:01<00:00, 25.00it/s, v_num=0, train_loss=0.123]",
     None, 1, {"train_loss": 0.123}, {}),
    ("Epoch 0:  50%|█████     | 16/32 [00:00<00:00, 25.0it/s, v_num=3]\rEpoch 0:  53%|█████▎    "
     "| 17/32 [00:00<00:00, 25.0it/s, v_num=3, train_loss=0.5, val_acc=0.75]", None, 0,
     {"train_loss": 0.5, "val_acc": 0.75}, {}),
    # tqdm postfix, tensors printed as such, wandb-style names, timestamps in front
    ("100%|█████| 1000/1000 [00:10<00:00, 99.5it/s, loss=1.23e+03]", None, None, {"loss": 1230.0}, {}),
    ("step 5 loss tensor(0.5234, grad_fn=<NllLossBackward0>)", 5, None, {"loss": 0.5234}, {}),
    ("train/loss=0.25 train/acc=0.9 trainer/global_step=10", 10, None,
     {"train/loss": 0.25, "train/acc": 0.9}, {}),
    ("2024-01-05 12:00:01,123 INFO step 5 loss 0.5", 5, None, {"loss": 0.5}, {}),
    ("accuracy: 98.5%", None, None, {"accuracy": 98.5}, {}),
    # NaN / Inf and huge numbers
    ("loss: nan", None, None, {"loss": NAN}, {}),
    ("Loss: NaN", None, None, {"loss": NAN}, {}),
    ("loss=inf", None, None, {"loss": INF}, {}),
    ("loss = -inf", None, None, {"loss": -INF}, {}),
    ("loss: 1e400", None, None, {"loss": INF}, {}),
    ("loss: 123456789012345678901234567890", None, None, {"loss": 1.2345678901234568e29}, {}),
    # configuration printouts that give totals
    ("Overriding: max_iters = 5000", None, None, {}, {"total_steps": 5000}),
]

NO_MATCH = [
    "Epoch 00005: reducing learning rate of group 0 to 1.0000e-04.",  # ReduceLROnPlateau
    "Adjusting learning rate of group 0 to 1.0000e-03.",  # scheduler verbose=True
    "Epoch 3: lr = 0.0010",  # a schedule printout, no loss
    "step 100: lr 0.0001",
    "torch version: 2.1.0+cu121",
    "lightning==2.2.0",
    "Python 3.10.12",
    "2024-01-05 12:00:01,123 INFO starting",
    "loss function: CrossEntropy",
    "Using loss: CrossEntropyLoss()",
    "loss: high",  # a string where a number should be
    "Warmup steps: 500",
    "number of parameters: 10.65M",
    "lower power answer 5",
    "Processing previous items 12 of 100",
    "",
    "x" * 100_000,
    "\r\r\r",
]


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b)


@pytest.mark.parametrize(("line", "step", "epoch", "values", "totals"), MATCHES,
                         ids=[m[0][:40] for m in MATCHES])
def test_default_patterns_match(line, step, epoch, values, totals):
    parsed = MetricParser().feed(line)
    assert parsed is not None
    assert parsed["step"] == step
    assert parsed["epoch"] == epoch
    assert set(parsed["values"]) == set(values)
    for name, value in values.items():
        assert _same(parsed["values"][name], value), name
    for key in ("total_steps", "total_epochs"):
        assert parsed.get(key) == totals.get(key)


@pytest.mark.parametrize("line", NO_MATCH, ids=[n[:40] for n in NO_MATCH])
def test_lines_that_are_not_metrics(line):
    assert MetricParser().feed(line) is None


def test_epoch_carried_into_later_value_lines():
    parser = MetricParser()
    parser.feed("Epoch 2/5")
    parsed = parser.feed("1875/1875 [====] - 3s 2ms/step - loss: 0.2950")
    assert parsed["epoch"] == 2
    assert parser.feed("Epoch 3/5")["total_epochs"] == 5


def test_user_patterns_add_metrics_and_positions():
    parser = MetricParser([r"it=(?P<step>\d+) gnorm=(?P<grad_norm>\S+)", r"kl (?P<kl>\S+)"])
    parsed = parser.feed("it=12 gnorm=3.5 kl 0.01")
    assert parsed["step"] == 12
    assert parsed["values"] == {"grad_norm": 3.5, "kl": 0.01}
    assert parser.feed("it=13 gnorm=oops") == {"step": 13, "epoch": None, "values": {}}


@pytest.mark.parametrize(("pattern", "fragment"), [
    ("loss=(?P<loss>[0-9.]+", "not a valid regex"),
    ("loss=([0-9.]+)", "no named group"),
    ("", "not a regular expression"),
    (42, "not a regular expression"),
])
def test_bad_user_pattern_names_it(pattern, fragment):
    with pytest.raises(ConfigError) as info:
        MetricParser([pattern])
    assert fragment in info.value.message
    assert repr(pattern) in info.value.message


CATASTROPHIC = [r"(?P<x>(a+)+)b", r"(?P<x>(a*)*b)", r"loss=(?P<loss>(\d{1,3},?)+)x",
                r"(?P<x>(?:(?:a|b)+)+)c", r"(?P<x>a+)+?!"]
SAFE = [r"gnorm=(?P<grad_norm>[0-9.e+-]+)", r"(?P<x>(?:ab)+)", r"t=(?P<t>(?:\d{2}:)+\d{2})",
        r"(?P<x>(?>a+)+)b", r"(?P<x>a+)++b"]


@pytest.mark.parametrize("pattern", CATASTROPHIC)
def test_nested_repeats_are_refused(pattern):
    with pytest.raises(ConfigError) as info:
        MetricParser([pattern])
    assert "repeats a part that itself repeats" in info.value.message
    assert "(?P<x>a+)b" in info.value.hint


@pytest.mark.parametrize("pattern", SAFE)
def test_patterns_without_nested_repeats_are_kept(pattern):
    assert len(MetricParser([pattern]).patterns) == 1


@pytest.mark.parametrize("where", ["config", "option"])
def test_catastrophic_pattern_is_refused_before_it_can_hang_a_command(tmp_path, where):
    """Without the check `local` reads 'aaaa...a' through (a+)+b for ever (2**60 tries)."""
    pattern = r"(?P<x>(a+)+)b"
    config = 'checkpoint_dir = "checkpoints"\n'
    if where == "config":
        config += f"[metrics]\npatterns = ['{pattern}']\n"
    (tmp_path / "trainctl.toml").write_text(config)
    (tmp_path / "train.py").write_text("print('loss ' + 'a' * 60)\n")
    (tmp_path / "out.log").write_text("loss " + "a" * 60 + "\n")
    args = (["local", "--no-preflight", "train.py"] if where == "config"
            else ["monitor", "--log", "out.log", "--pattern", pattern])
    proc = run_cli(args, tmp_path, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "repeats a part that itself repeats" in proc.stderr and "Traceback" not in proc.stderr
    if where == "config":
        assert "trainctl.toml:3" in proc.stderr
        assert not (tmp_path / ".trainctl" / "sessions").exists()  # refused before anything ran


def test_a_pattern_too_slow_on_one_line_is_turned_off_with_a_warning():
    # polynomial, not nested: passes the static check, but costs ~n**4 steps on a line of a's
    parser = MetricParser([r"(?P<x>a*a*a*c)", r"loss=(?P<loss>[0-9.]+)"])
    with pytest.warns(TrainctlWarning, match="no longer used for this run"):
        parser.feed("a" * 400)
    assert [p.pattern for p in parser.patterns] == [r"loss=(?P<loss>[0-9.]+)"]
    assert parser.dropped == [r"(?P<x>a*a*a*c)"]
    assert parser.feed("loss=0.5")["values"] == {"loss": 0.5}


def test_feed_text_matches_line_by_line():
    lines = [m[0] for m in MATCHES] + NO_MATCH[:-2] + ["plain output line 7"] * 50
    text = "\n".join(lines) + "\n"
    one_by_one = [p for p in map(MetricParser().feed, text.replace("\r", "\n").split("\n")) if p]
    chunked = MetricParser().feed_text(text)
    assert _dump(chunked) == _dump(one_by_one)
    newest = MetricParser().feed_text(text, limit=2)  # skipped lines carry no epoch/step forward
    assert _dump([p["values"] for p in newest]) == _dump([p["values"] for p in one_by_one[-2:]])


def _dump(items):
    return repr(items).replace("nan", "NaN")


@pytest.mark.parametrize(("args", "expected"), [
    (["--epochs", "5"], {"steps": None, "epochs": 5}),
    (["--epochs=5"], {"steps": None, "epochs": 5}),
    (["--max_epochs", "7", "--lr", "0.1"], {"steps": None, "epochs": 7}),
    (["--max-epochs=2"], {"steps": None, "epochs": 2}),
    (["--max_iters=5000"], {"steps": 5000, "epochs": None}),
    (["config/train_shakespeare_char.py", "max_iters=300"], {"steps": 300, "epochs": None}),
    (["--max_steps", "100", "--num_train_epochs", "3.0"], {"steps": 100, "epochs": 3}),
    (["--max_steps", "-1", "--num_train_epochs", "2.5"], {"steps": None, "epochs": 3}),
    (["--trainer.max_epochs=4"], {"steps": None, "epochs": 4}),
    (["--epochs", "many"], {"steps": None, "epochs": None}),
    (["--epochs"], {"steps": None, "epochs": None}),
    ([], {"steps": None, "epochs": None}),
])
def test_infer_totals(args, expected):
    assert infer_totals(args) == expected


def test_sparkline_and_trend():
    assert metrics.sparkline([1, 2, 3, 4, 5, 6, 7, 8]) == "▁▂▃▄▅▆▇█"
    assert metrics.sparkline([3, 3, 3]) == "▄▄▄"
    assert metrics.sparkline([1, NAN, 2]) == "▁!█"
    assert len(metrics.sparkline(list(range(1000)), 20)) == 20
    assert metrics.sparkline([], 10) == ""
    t = metrics.trend([5.0, 4.0, 3.0, 2.0, 1.0], mode="min")
    assert t["last"] == 1.0 and t["best"] == 1.0 and t["best_index"] == 4
    assert t["slope"] == pytest.approx(-1.0) and t["direction"] == "improving"
    assert metrics.trend([1.0, 2.0, 3.0], mode="min")["direction"] == "worsening"


def test_rate_eta_duration():
    assert metrics.rate([(100.0, 0), (110.0, 100)]) == pytest.approx(10.0)
    assert metrics.rate([(100.0, 5)]) is None
    assert metrics.eta_seconds(500, 1000, 10.0) == pytest.approx(50.0)
    assert metrics.eta_seconds(500, None, 10.0) is None
    assert metrics.format_duration(45) == "45s"
    assert metrics.format_duration(6 * 60) == "6m00s"
    assert metrics.format_duration(3900) == "1h05m"
    assert metrics.format_duration(None) == "?"


def test_warning_rules():
    assert metrics.nonfinite_warning({"loss": [1.0, NAN]})["kind"] == "nan"
    assert metrics.nonfinite_warning({"loss": [NAN, 1.0]}) is None
    rising = [1.0 + 0.1 * i for i in range(30)]
    assert metrics.divergence_warning("loss", rising, window=30)["kind"] == "divergence"
    assert metrics.divergence_warning("loss", rising[::-1], window=30) is None
    flat = [2.0 - 0.1 * i for i in range(10)] + [1.5] * 20
    assert metrics.plateau_warning("loss", flat, window=10)["kind"] == "plateau"
    assert metrics.plateau_warning("loss", rising[::-1], window=10) is None
    usage = {"path": "/x", "free_bytes": 10, "total_bytes": 1000}
    assert metrics.disk_warning(usage, min_free_bytes=1)["kind"] == "disk_full"
    assert metrics.stall_warning(now=1000, last_output_t=100, last_metric_t=100, stall_s=600)
    assert metrics.stall_warning(now=1000, last_output_t=900, last_metric_t=900, stall_s=600) is None


@pytest.mark.parametrize("line", [
    "ValueError: boom in step 7",
    "RuntimeError: loss 0.5 at epoch 3",
    "torch.OutOfMemoryError: CUDA out of memory at step 9",
    "/work/train.py:12: UserWarning: step 3 loss is nan",
    "KeyboardInterrupt",
])
def test_an_exception_or_warning_line_is_not_read_as_metrics(line):
    """The progress line showed "step 7 (failed)" from `ValueError: boom in step 7`, and a
    warning's file:line became a metric."""
    parser = MetricParser()
    parser.feed("step 5 loss 0.40")
    assert parser.feed(line) is None
    assert parser.step == 5


@pytest.mark.parametrize("line, values", [
    ("MeanSquaredError: 0.25 step 8", {"meansquarederror": 0.25}),
    ("val_error: 0.3 step 8", {"val_error": 0.3}),
])
def test_a_metric_named_like_an_error_is_still_a_metric(line, values):
    result = MetricParser().feed(line)
    assert result is not None and result["values"] == values and result["step"] == 8
