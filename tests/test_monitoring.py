"""Watching a run: flat metrics, the Lightning callback through real CSV and TensorBoard loggers, the plot helper.

Every logger is the real package, and what it wrote is read back from disk.
"""

from __future__ import annotations

import csv
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny import TinyNet, batch, train_steps
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

import recm_opt as recm
from recm_opt.monitoring import metrics, plot_history

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4


def _opt(model: torch.nn.Module) -> recm.RECMOptimizer:
    return recm.RECMOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, target=recm.Vector("b xyz"),
                              a=0.1, example=torch.zeros(1, 4, 3))


def test_metrics_are_flat_floats_keyed_by_layer_and_term() -> None:
    """One float per (layer, alpha term), beta and |h|, equal to the report's values, before and after steps."""
    model = TinyNet()
    opt = _opt(model)
    expected = {f"recm/{n}/{k}" for n in ("enc", "dec") for k in ("alpha/weight", "beta", "h_norm")}
    assert set(metrics(opt)) == expected  # before any step: the same keys
    train_steps(model, opt, range(3))
    flat = metrics(opt)
    assert set(flat) == expected and all(type(v) is float for v in flat.values())
    for row in opt.report():
        assert flat[f"recm/{row['name']}/alpha/weight"] == row["alpha"]["weight"]
        assert flat[f"recm/{row['name']}/beta"] == row["beta"]
        assert flat[f"recm/{row['name']}/h_norm"] == row["h_norm"] > 0
    assert metrics(opt.report(gaps=True)) == flat  # the diagnostics never change the keys


def test_metrics_keys_do_not_depend_on_optional_packages() -> None:
    """With scipy, e3nn, matplotlib and lightning made unimportable, a fresh process logs the same keys."""
    code = (
        "import sys\n"
        "for m in ('scipy', 'e3nn', 'matplotlib', 'lightning', 'pytorch_lightning', 'tensorboard'):\n"
        "    sys.modules[m] = None\n"
        "import torch, tiny, recm_opt as recm\n"
        "from recm_opt.monitoring import metrics\n"
        "m = tiny.TinyNet()\n"
        "o = recm.RECMOptimizer(torch.optim.AdamW(m.parameters(), lr=1e-2), m, target=recm.Vector('b xyz'),"
        " a=0.1, example=torch.zeros(1, 4, 3))\n"
        "tiny.train_steps(m, o, range(2))\n"
        "print(sorted(metrics(o)))\n"
    )
    env = {"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    model = TinyNet()
    opt = _opt(model)
    train_steps(model, opt, range(2))
    assert out.stdout.strip() == str(sorted(metrics(opt)))


def test_metrics_rejects_what_is_not_a_report() -> None:
    with pytest.raises(TypeError, match="RECMOptimizer or its report"):
        metrics({"name": "enc"})


def test_logging_every_step_costs_a_small_fraction_of_a_step() -> None:
    """metrics(opt) (report without gaps) costs far less than a step: < 15 % on this 2-layer model (min of 5).

    Measured alone: 2 to 5 % of a 4 ms step here, 9 % of the 5.4 ms VectorNet step (3 layers); the exact W1 that
    report(gaps=True) adds used to cost 118 to 138 ms a call. The bound leaves room for a shared, loaded machine.
    """
    model = TinyNet()
    opt = _opt(model)
    x, y = batch(64)

    def run() -> float:
        t0 = time.perf_counter()
        for _ in range(20):
            loss = (model(x) - y).pow(2).mean()
            loss.backward()
            opt.step(target=y)
            opt.zero_grad()
        return (time.perf_counter() - t0) / 20

    run()  # warm-up
    plain = min(run() for _ in range(5))
    only = min(_time_metrics(opt) for _ in range(5))
    assert only < 0.15 * plain, f"metrics() {only * 1e3:.3f} ms vs step {plain * 1e3:.3f} ms"


def _time_metrics(opt: recm.RECMOptimizer) -> float:
    t0 = time.perf_counter()
    for _ in range(20):
        metrics(opt)
    return (time.perf_counter() - t0) / 20


def test_plot_history_draws_alpha_and_beta_per_layer(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    model = TinyNet()
    opt = _opt(model)
    steps, history = [], []
    for s in range(4):
        train_steps(model, opt, range(s, s + 1))
        steps.append(s)
        history.append(metrics(opt))
    fig = plot_history(steps, history, tmp_path / "alpha.png", title="tiny")
    assert (tmp_path / "alpha.png").stat().st_size > 1000
    assert [ax.get_title() for ax in fig.axes] == ["enc", "dec"]
    labels = [line.get_label() for line in fig.axes[0].lines]
    assert labels == ["alpha_weight", "beta"]
    assert list(fig.axes[0].lines[1].get_ydata()) == [m["recm/enc/beta"] for m in history]
    with pytest.raises(ValueError, match="same length"):
        plot_history(steps[:2], history)
    with pytest.raises(ValueError, match="no 'recm/<layer>"):
        plot_history([0], [{"loss": 1.0}])


# ----------------------------------------------------------------------------------------------- Lightning

pl = pytest.importorskip("pytorch_lightning")


class LitTiny(pl.LightningModule):
    """The documented pattern: the wrapper from configure_optimizers, observe(y) in training_step."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TinyNet()

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = (self(x) - y).pow(2).mean()
        self.optimizers().observe(y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self) -> recm.RECMOptimizer:
        return recm.RECMOptimizer(torch.optim.AdamW(self.parameters(), lr=1e-2), self, target=recm.Vector("b xyz"),
                                  a=0.1, example=torch.zeros(1, 4, 3))


def _loader(n: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n * 8, 4, 3, generator=g)
    return DataLoader(TensorDataset(x, x[:, 0] * 2 + torch.tensor([0.5, 0.0, 0.0])), batch_size=8)


def _trainer(steps: int, root: Path, logger: object) -> pl.Trainer:
    from recm_opt.lightning import RECMMetrics

    return pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=logger, default_root_dir=str(root),
                      callbacks=[RECMMetrics(every_n_steps=1)], enable_checkpointing=True, log_every_n_steps=1,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)


def _tb_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lightning_callback_logs_to_csv_then_tensorboard_across_a_resume(tmp_path: Path) -> None:
    """fit with a CSVLogger and checkpointing, then a fresh module and Trainer resume with fit(ckpt_path=...) and a
    TensorBoardLogger: both files hold every RECM key at every step, and the last logged values are the model's."""
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

    pytest.importorskip("tensorboard")
    torch.manual_seed(0)
    first = LitTiny()
    csv_logger = CSVLogger(str(tmp_path), name="csv")
    _trainer(2, tmp_path, csv_logger).fit(first, _loader(STEPS))
    ckpts = sorted((tmp_path / "csv").rglob("*.ckpt"))
    assert ckpts, "checkpointing was on: a checkpoint must exist"
    rows = list(csv.DictReader(open(Path(csv_logger.log_dir) / "metrics.csv")))
    keys = set(metrics(first.trainer.optimizers[0]))
    logged = [r for r in rows if r.get("recm/net.enc/beta")]
    assert [int(r["step"]) for r in logged] == [0, 1]  # one row per step, with Lightning's own loss
    assert all(r["loss"] for r in logged) and len(rows) == 2
    assert keys <= set(rows[0])
    assert float(logged[-1]["recm/net.enc/h_norm"]) == pytest.approx(float(first.net.enc.recm_modulation.h.norm()))

    torch.manual_seed(1)
    resumed = LitTiny()
    tb_logger = TensorBoardLogger(str(tmp_path), name="tb")
    _trainer(STEPS, tmp_path, tb_logger).fit(resumed, _loader(STEPS), ckpt_path=str(ckpts[-1]))
    assert int(resumed.net.enc.recm_modulation.t) == STEPS
    scalars = _tb_scalars(Path(tb_logger.log_dir))
    assert keys <= set(scalars)
    assert [s for s, _ in scalars["recm/net.dec/alpha/weight"]] == [s for s, _ in scalars["loss"]] == [2, 3]
    final = metrics(resumed.trainer.optimizers[0])
    for key in keys:
        assert scalars[key][-1][1] == pytest.approx(final[key], rel=1e-6, abs=1e-7)  # TensorBoard stores float32


def test_lightning_module_without_lightning_says_what_to_install() -> None:
    """Without Lightning, importing recm_opt.lightning raises ImportError naming the extra to install."""
    code = ("import sys\nsys.modules['lightning'] = sys.modules['pytorch_lightning'] = None\n"
            "try:\n    import recm_opt.lightning\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert "pip install 'recm_opt[lightning]'" in out.stdout, out.stdout + out.stderr


def test_callback_rejects_a_bad_interval() -> None:
    from recm_opt.lightning import RECMMetrics

    with pytest.raises(ValueError, match="every_n_steps must be an int >= 1"):
        RECMMetrics(every_n_steps=0)


# ----------------------------------------------------------------------------------------------- TensorBoard


def test_tensorboard_example_writes_events_that_read_back(tmp_path: Path) -> None:
    """examples/tensorboard_logging.py writes one scalar per RECM key and step with SummaryWriter."""
    pytest.importorskip("tensorboard")
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "tensorboard_logging.py"), "--steps", "6",
                          "--logdir", str(tmp_path)], capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    scalars = _tb_scalars(tmp_path)
    recm_keys = {k for k in scalars if k.startswith("recm/")}
    assert len(recm_keys) == 3 * 5  # 3 layers x (alpha of weight, bias, noise; beta; h_norm)
    for key in recm_keys:
        assert [s for s, _ in scalars[key]] == list(range(6))
    assert "train/loss" in scalars
