"""The victim artifact: a saved model a defender deploys, and the callable that serves it.

A victim directory holds

- ``victim.pt2``  the model as a ``torch.export`` program: the converted int8 program for
                  ``qat`` / ``divqat``, the trained fp32 model for ``fp32``; normalization inside.
- ``victim.json`` metadata: dataset, normalization, input shape, classes, arch, mode, DivQAT
                  settings, seed, library versions, test accuracies.
- ``weights.pt``  (fp32 only) the ``state_dict`` a QAT run starts from.

``load_victim(DIR)`` returns a ``Victim``: images float32 in [0, 1], shape (N, C, H, W) at the
victim's input size -> logits (N, K). int8 programs run through ``torch.compile`` with inductor
freezing, so they run on real int8 kernels. ``load_victim(FILE.pte)`` (or a folder holding one
``.pte``) returns the device program of ``divqat export`` run by ExecuTorch, with the same
interface (``divqat.edge.EdgeVictim``).
"""

from __future__ import annotations

import copy
import json
import types
import warnings
import zipfile
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from torch import nn

import divqat
from divqat.data import check_victim_input
from divqat.edge import is_program_path
from divqat.errors import ArtifactError
from divqat.io import atomic_write, write_json
from divqat.models.normalized import VictimNet, build_net
from divqat.quant import compile_int8, quiet_torchao
from divqat.stopwatch import phase, timed

FORMAT = "divqat-victim"
FORMAT_VERSION = 1
PROGRAM, METADATA, WEIGHTS = "victim.pt2", "victim.json", "weights.pt"
INT8_MODES = ("qat", "divqat")
# The compiled int8 program is static-shape (see quant.compile_int8): queries run in chunks
# padded up to one of these batch sizes, so at most three compilations ever happen.
BUCKETS = (16, 64, 256)
# What every victim's metadata holds, and what defenses, detectors and their drivers read from it.
VICTIM_KEYS = ("dataset", "arch", "input_shape", "classes", "mean", "std")


@timed("save")
def save_victim(out: str | Path, program: torch.export.ExportedProgram, metadata: dict,
                weights: dict | None = None) -> Path:
    """Write a victim directory (program, metadata and, for fp32, the weights). Returns the path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "No complete tensor found in the group": CPU weights, harmless
        atomic_write(out / PROGRAM, lambda tmp: torch.export.save(program, tmp))
    if weights is not None:
        atomic_write(out / WEIGHTS, lambda tmp: torch.save(weights, tmp))
    # Metadata last: a directory with a victim.json is a complete artifact.
    write_json(out / METADATA, {"format": FORMAT, "format_version": FORMAT_VERSION, **metadata})
    return out


def read_metadata(path: str | Path) -> dict:
    """The metadata of a victim directory (or of a device program), with a clear error when it
    is not one."""
    path = Path(path)
    if is_program_path(path):
        from divqat.edge import read_edge_metadata

        return read_edge_metadata(path)
    meta_path = path / METADATA
    if not path.is_dir():
        raise ArtifactError(f"no victim directory at {path} (train one with `divqat train --out {path}`)")
    if not meta_path.is_file():
        raise ArtifactError(f"{path} is not a divqat victim: {METADATA} is missing "
                            f"(expected {PROGRAM} and {METADATA}, written by `divqat train`)")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{meta_path} is corrupt ({e}); retrain the victim") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ArtifactError(f"{meta_path} is not divqat victim metadata (no \"format\": \"{FORMAT}\")")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{meta_path} has format version {meta.get('format_version')}; this divqat "
                            f"reads version {FORMAT_VERSION}")
    return meta


def victim_metadata(victim_dir: str | Path) -> dict:
    """A victim's metadata, refused (``ArtifactError``) without what defenses and their
    evaluation need: dataset, arch, input shape, classes and normalization (``VICTIM_KEYS``)."""
    meta = read_metadata(victim_dir)
    missing = [k for k in VICTIM_KEYS if k not in meta]
    if missing:
        raise ArtifactError(f"{Path(victim_dir) / 'victim.json'} lacks {', '.join(missing)}; "
                            "retrain the victim with this divqat")
    return meta


def provenance(*packages: str) -> dict[str, str | None]:
    """The versions an artifact was made with, as its metadata's ``versions``: ``divqat`` and
    ``torch``, then each of ``packages`` by its distribution name (None where not installed)::

        >>> provenance("torchao")
        {'divqat': '0.1.0', 'torch': '2.13.0', 'torchao': '0.18.0'}
    """
    out: dict[str, str | None] = {"divqat": divqat.__version__, "torch": torch.__version__}
    for package in packages:
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out


def load_fp32_net(path: str | Path, arch: nn.Module | None = None) -> tuple[VictimNet, dict]:
    """The trainable fp32 model of an fp32 victim (QAT and DivQAT start from it; it is their teacher).

    arch: the architecture as a module (a copy is loaded), for a victim trained in Python from an
    ``nn.Module``; None rebuilds it from the metadata's ``arch`` spec.
    """
    meta = read_metadata(path)
    if meta.get("mode") != "fp32":
        raise ArtifactError(f"{path} holds a {meta.get('mode')} victim; a QAT teacher must be an fp32 "
                            "victim (`divqat train --mode fp32`)")
    weights = Path(path) / WEIGHTS
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        if arch is None:
            net = build_net(meta)
        else:
            net = VictimNet(copy.deepcopy(arch), meta["input_shape"][0], len(meta["classes"]),
                            tuple(meta["mean"]), tuple(meta["std"]))
        net.load_state_dict(state)
    except FileNotFoundError as e:
        raise ArtifactError(f"{weights} is missing; retrain the fp32 victim") from e
    except (RuntimeError, zipfile.BadZipFile, EOFError, KeyError) as e:
        raise ArtifactError(f"{weights} is truncated or does not match arch {meta.get('arch')!r}: {e}") from e
    return net.eval(), meta


class Victim:
    """A loaded victim: ``victim(images) -> logits``.

    images: float32 in [0, 1], shape (N, C, H, W) = (N, *input_shape); returns logits (N, K) on the
    CPU. Runs without gradients. ``input_shape``, ``num_classes``, ``classes``, ``mode`` and
    ``metadata`` describe it.
    """

    # Never edits the images it is given (normalization makes a new tensor), so the black box
    # can skip its defensive copy of every query.
    writes_input = False
    # What the underlying program answers (an EdgeVictim with a fused defense: "posteriors").
    outputs = "logits"

    def __init__(self, module: nn.Module, metadata: dict, path: Path, device: str = "cpu",
                 compile: bool | None = None) -> None:
        self.metadata = metadata
        self.path = path
        self.device = torch.device(device)
        self.mode: str = metadata["mode"]
        self.input_shape: tuple[int, int, int] = tuple(metadata["input_shape"])
        self.classes: tuple[str, ...] = tuple(metadata["classes"])
        self.num_classes = len(self.classes)
        self.int8 = self.mode in INT8_MODES
        module = module.to(self.device)
        self._module = module
        self._compiled = self.int8 if compile is None else compile
        # Edge-target programs (XNNPACK's int8 activations) compile without freezing: see compile_int8.
        self._freezing = metadata.get("target", "x86") != "edge"
        self._forward = compile_int8(module, self._freezing) if self._compiled else module

    def __repr__(self) -> str:
        return (f"Victim({self.metadata.get('arch')}, mode={self.mode}, dataset={self.metadata.get('dataset')}, "
                f"input_shape={self.input_shape}, classes={self.num_classes})")

    def _check(self, images: torch.Tensor) -> torch.Tensor:
        return check_victim_input(images, self.input_shape)

    def _chunks(self, images: torch.Tensor):
        """(chunk on the victim's device, the rows of its output that answer new images) in
        order. Compiled victims get chunks of at most 256 rows, a short one zero-padded up to a
        bucket size; the short last chunk of a longer query is instead topped up with the images
        before it, so that it runs through the 256 program already compiled rather than
        compiling another (seconds, in every process that serves the victim)."""
        n = images.shape[0]
        step = BUCKETS[-1] if self._compiled else 1024
        for start in range(0, n, step):
            stop = min(start + step, n)
            low = max(0, stop - step) if self._compiled else start
            chunk = images[low:stop]
            if chunk.device != self.device:
                chunk = chunk.to(self.device)
            m = chunk.shape[0]
            if self._compiled:
                size = next(b for b in BUCKETS if b >= m)
                if size != m:
                    chunk = torch.cat([chunk, chunk.new_zeros((size - m, *chunk.shape[1:]))])
            yield chunk, slice(start - low, stop - low)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = self._check(images)
        if images.shape[0] == 0:
            return torch.empty(0, self.num_classes)
        return torch.cat([self._forward(chunk)[rows].float().cpu() for chunk, rows in self._chunks(images)])

    def with_epilogue(self, epilogue: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]
                      ) -> Callable[[torch.Tensor], tuple[torch.Tensor, ...]] | None:
        """``images -> (logits, *epilogue(logits))`` compiled as one program, or None for a victim
        that is not compiled (an fp32 victim runs eagerly: there is no program to fuse into).

        ``epilogue`` maps logits (N, K) to tensors of N rows, except 0-dim counts, which are
        summed over the chunks of a large query. This is how a served defense's formula runs
        inside the int8 program (``Defense.epilogue``, used by ``DefendedVictim``): the victim's
        run leaves the caches cold for small tensor ops issued after it. Compiles once per
        bucket size on first use (a few seconds each), like the victim itself. ``images`` must
        already be valid (float32 (N, *input_shape) in [0, 1], non-empty): the caller checked
        them.
        """
        if not self._compiled:
            return None
        program = compile_int8(_WithEpilogue(self._module, epilogue), self._freezing)

        @torch.no_grad()
        def run(images: torch.Tensor) -> tuple[torch.Tensor, ...]:
            parts = [(program(chunk), rows) for chunk, rows in self._chunks(images)]
            first, rows = parts[0]
            if len(parts) == 1 and rows.stop - rows.start == first[0].shape[0]:
                outputs = first  # the common case: one full bucket, nothing to slice
            else:
                # A count (a 0-dim output) sums over the chunks, rows that top up a short
                # last chunk included: it can only overcount, and it is tested for 0.
                outputs = tuple(sum(out[i] for out, _ in parts) if first[i].ndim == 0
                                else torch.cat([out[i][rows] for out, rows in parts])
                                for i in range(len(first)))
            if self.device.type != "cpu":
                outputs = tuple(t.cpu() for t in outputs)
            return outputs

        return run


class _WithEpilogue(nn.Module):
    """A victim's network followed by an epilogue on its logits, compiled together."""

    def __init__(self, net: nn.Module, epilogue: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]) -> None:
        super().__init__()
        self.net = net
        self.epilogue = epilogue
        # A forward with a code object of its own: dynamo keeps its compiled programs on the code
        # object, at most 8 (its recompile limit), so with the class's shared forward the third
        # fused defense of a process (3 bucket sizes each) would silently run the int8 program
        # eagerly instead: seen, 6x slower, logits off by up to 0.06.
        code = _WithEpilogue.forward.__code__.replace()
        self.forward = types.MethodType(types.FunctionType(code, globals(), "forward"), self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits = self.net(x)
        return (logits, *self.epilogue(logits))


def load_victim(path: str | Path, device: str = "cpu", compile: bool | None = None,
                key_file: str | Path | None = None) -> Victim:
    """Load a victim directory written by ``divqat train`` (in any process), or a device program
    written by ``divqat export`` (a ``.pte`` file or a folder holding one: an ``EdgeVictim``, run
    by ExecuTorch; ``key_file`` decrypts a sealed one, default ``$DIVQAT_KEY_FILE``).

    compile: None = compile int8 victims with inductor freezing and run fp32 ones eagerly.
    Raises ``ArtifactError`` with the reason for a missing, truncated or foreign artifact.
    """
    path = Path(path)
    if is_program_path(path):
        from divqat.edge import load_edge_victim

        return load_edge_victim(path, device=device, key_file=key_file)
    meta = read_metadata(path)
    program = path / PROGRAM
    if not program.is_file():
        raise ArtifactError(f"{program} is missing; the victim directory is incomplete, retrain it")
    quiet_torchao()  # registers the quantized ops the int8 program refers to
    try:
        with warnings.catch_warnings(), phase("load"):
            warnings.simplefilter("ignore")  # "No complete tensor found in the group": CPU weights, harmless
            module = torch.export.load(program).module()
    except Exception as e:  # torch raises many types for a damaged archive
        raise ArtifactError(f"{program} is truncated or not a torch.export program ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); retrain the victim") from e
    return Victim(module, meta, path, device=device, compile=compile)
