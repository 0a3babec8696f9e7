"""Every python code block of README.md and docs/ runs as written.

A block runs in a fresh namespace. The names it uses without defining (``model``, ``loader``,
``opt``, ...) come from the context of its page: the smallest set of definitions, built in
order, that the block needs, so that a block which builds its own optimizer gets none (and
fails if it forgot ``example=``). README.md gets no context: its block stands alone. A block
may opt out only with a marker on the line before it that gives the reason:
``<!-- snippet: skip (why) -->``. A block whose lines are alternatives ("swap one line") is
marked ``<!-- snippet: alternatives -->``, and each line runs on its own.
"""

from __future__ import annotations

import ast
import builtins
import re
import warnings
from pathlib import Path

import pytest
import torch

import recm_opt as recm

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
_MARKER = re.compile(r"<!--\s*snippet:\s*(skip|alternatives)\s*(.*?)\s*-->\s*$")

_IMPORTS = "import os\nimport torch\nfrom torch import nn\nimport recm_opt as recm\n"

# name: (names it needs, code). The training-loop pages' context: the tests' tiny vector model.
LOOPS: dict[str, tuple[tuple[str, ...], str]] = {
    "Net": ((), "from tiny import TinyNet as Net"),
    "batch": ((), "from tiny import batch"),
    "model": (("Net",), "model = Net()"),
    "x": (("batch",), "x, y = batch(16)"),
    "y": (("x",), ""),
    "example_batch": (("x",), "example_batch = x[:1]"),
    "loader": (("batch",), "loader = [batch(16, seed=i) for i in range(4)]"),
    "loss_fn": ((), "def loss_fn(out, y):\n    return (out - y).pow(2).mean()"),
    "accumulate": ((), "accumulate = 2"),
    "epochs": ((), "epochs = 2"),
    "opt": (("model", "x"), "opt = recm.RECMOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), model, "
                            "target=recm.Vector('b xyz'), example=x, total_steps=8)"),
    "inner": (("model",), "inner = torch.optim.AdamW(model.parameters(), lr=1e-3)"),
    "loss": (("opt", "loss_fn"), "loss = loss_fn(model(x), y)"),
    "path": ((), "path = os.path.join(tmp_dir, 'checkpoint')"),
    "tmp": ((), "tmp = os.path.join(tmp_dir, 'checkpoint.tmp')"),
    "out_dir": ((), "out_dir = os.path.join(tmp_dir, 'trainer')"),
    "dataset": (("batch",), "_x, _y = batch(64)\ndataset = [{'x': a, 'labels': b} for a, b in zip(_x, _y)]"),
    "build": (("Net", "x"), "def build():\n    model = Net()\n    return model, recm.RECMOptimizer(torch.optim.AdamW("
                            "model.parameters(), lr=1e-3), model, target=recm.Vector('b xyz'), example=x, "
                            "total_steps=8)"),
    "accelerator": ((), "from accelerate import Accelerator\naccelerator = Accelerator(cpu=True)"),
    "pl": ((), "import pytorch_lightning as pl"),
    "DistributedDataParallel": (("process group",), "from torch.nn.parallel import DistributedDataParallel"),
    # a one-rank gloo group, for blocks that use DDP or fully_shard
    "process group": ((), "import torch.distributed as dist\n"
                          "dist.init_process_group('gloo', init_method='file://' + os.path.join(tmp_dir, 'pg'), "
                          "rank=0, world_size=1)"),
}

# The user guide's context: the guide's own layer (Vector-Neuron features with points, sizes not declared).
GUIDE = {**LOOPS}
GUIDE.update({
    "RelaxedVNLinear": ((), '''
@recm.relaxed(inputs=recm.Vector("b c xyz n", units="b n"), terms={"weight": "un", "bias": "bias", "noise": "sigma"})
class RelaxedVNLinear(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.eq = nn.Parameter(torch.randn(c_out, c_in) / c_in**0.5)
        self.un = nn.Parameter(torch.zeros(3 * c_out, 3 * c_in))
        self.bias = nn.Parameter(torch.zeros(c_out, 3))
        self.sigma = nn.Parameter(torch.full((), 1e-2))
    def equivariant(self, z):
        return torch.einsum("oc,bcxn->boxn", self.eq, z)
    def unconstrained(self, term, z):
        b, c, _, n = z.shape
        if term == "weight":
            flat = z.permute(0, 3, 1, 2).reshape(b, n, 3 * c) @ self.un.T
            return flat.view(b, n, -1, 3).permute(0, 2, 3, 1)
        if term == "bias":
            return self.bias[None, :, :, None].expand(b, -1, -1, n)
        return self.sigma * torch.randn(b, self.bias.shape[0], 3, n)
'''),
    "model": (("RelaxedVNLinear",), "model = nn.Sequential(RelaxedVNLinear(4, 8), RelaxedVNLinear(8, 2))"),
    "x": ((), "x, y = torch.randn(16, 4, 3, 10), torch.randn(16)"),
    "loss_fn": ((), "def loss_fn(out, y):\n    return (out.pow(2).mean((1, 2, 3)) - y).pow(2).mean()"),
    "opt": (("model", "x"), "opt = recm.RECMOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), model, "
                            "target=recm.Invariant('b'), example=x, total_steps=8)"),
})

CONTEXTS = {"README.md": {}, "docs/guide.md": GUIDE}


def _blocks() -> list[tuple[str, int, str, str | None]]:
    """(page, line, code, skip reason) of every python block; each line of an alternatives block on its own."""
    out = []
    for page in PAGES:
        text = page.read_text()
        for m in _BLOCK.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
            marker = _MARKER.search(before)
            name = str(page.relative_to(ROOT))
            if marker and marker.group(1) == "alternatives":
                out += [(name, line + i + 1, code, None) for i, code in enumerate(m.group(1).splitlines())]
            else:
                out.append((name, line, m.group(1), marker.group(2) if marker else None))
    return out


def _free_names(code: str) -> list[str]:
    """Names the block reads before it assigns them (an assignment counts after its right-hand side)."""
    tree = ast.parse(code)
    first: dict[str, tuple[tuple[int, int], bool]] = {}

    def see(name: str, pos: tuple[int, int], load: bool) -> None:
        if name not in first or pos < first[name][0]:
            first[name] = (pos, load)

    after: dict[int, tuple[int, int]] = {}  # Name nodes assigned by a statement: positioned after its value
    for node in ast.walk(tree):
        value = getattr(node, "value", None) if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
        value = node.iter if isinstance(node, (ast.For, ast.comprehension)) else value
        if value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                for n in ast.walk(t):
                    after[id(n)] = (value.end_lineno, value.end_col_offset)
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            see(node.id, after.get(id(node), (node.lineno, node.col_offset)), isinstance(node.ctx, ast.Load))
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            see(node.name, (node.lineno, node.col_offset), False)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for a in node.names:
                see((a.asname or a.name).split(".")[0], (node.lineno, node.col_offset), False)
    return [n for n, (_, load) in first.items() if load and not hasattr(builtins, n)]


def _context(page: str, code: str) -> str:
    entries = CONTEXTS.get(page, LOOPS)
    order: list[str] = []

    def need(name: str) -> None:
        if name in entries and name not in order:
            for dep in entries[name][0]:
                need(dep)
            order.append(name)

    for name in _free_names(code):
        need(name)
    if "fully_shard(" in code:
        need("process group")
    return "\n".join(entries[n][1] for n in order)


BLOCKS = _blocks()
# torch.compile blocks compile the example forward with inductor: about 20 s on one core.
_PARAMS = [pytest.param(*b, id=f"{b[0]}:{b[1]}", marks=[pytest.mark.slow] if "torch.compile(" in b[2] else [])
           for b in BLOCKS]


@pytest.mark.parametrize(("page", "line", "code", "skip"), _PARAMS)
def test_code_block_runs(page: str, line: int, code: str, skip: str | None, tmp_path: Path,
                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The block runs as written, after the definitions of its page's context that it uses."""
    if skip is not None:
        assert re.fullmatch(r"\(.{8,}\)", skip), f"{page}:{line}: a skip marker needs a reason: {skip!r}"
        pytest.skip(f"{page}:{line} opts out: {skip[1:-1]}")
    monkeypatch.chdir(tmp_path)  # files a block writes ("model.pt") land in a temporary folder
    torch.manual_seed(0)
    namespace: dict = {"__name__": "snippet", "tmp_dir": str(tmp_path)}
    setup = _IMPORTS + _context(page, code) if page != "README.md" else ""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the snippets' own warnings (no CUDA for autocast, ...) are not the point
            # but a snippet that leaves out the run length teaches a warning: it must pass total_steps
            warnings.filterwarnings("error", message="RECMOptimizer does not know the run length")
            exec(compile(setup, f"{page} context", "exec"), namespace)
            exec(compile("\n" * line + code, page, "exec"), namespace)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_every_page_with_code_is_collected() -> None:
    """The README and the guide and training-loop pages contribute blocks (the collector finds them)."""
    pages = {p for p, *_ in BLOCKS}
    assert {"README.md", "docs/guide.md", "docs/training-loops.md"} <= pages


def test_names_the_docs_use_are_public() -> None:
    """Every ``recm.<name>`` in a code block is in ``recm_opt.__all__`` (pyright and mypy --strict accept it)."""
    used = {n for _, _, code, _ in BLOCKS for n in re.findall(r"\brecm\.([A-Za-z_]\w*)", code)}
    assert sorted(used - set(recm.__all__)) == []


def test_integrations_table_names_tests_that_exist() -> None:
    """Each test the README's integrations table cites is a file of tests/, and a named test is defined in it."""
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Integrations", 1)[1].split("\n## ", 1)[0]
    cited = re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?`", table)
    assert len(cited) >= 15
    missing = []
    for path, name in cited:
        source = ROOT / path
        if not source.is_file() or (name and f"def {name}(" not in source.read_text()):
            missing.append(f"{path}::{name}" if name else path)
    assert not missing, missing
