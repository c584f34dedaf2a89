"""PyTorch runner: TorchScript `model.pt` or torch.export `model.pt2`, run under inference_mode.

torch is imported only when a torch version is loaded: it costs over a second and is an
optional extra (`pip install 'rollguard[torch]'`).
"""

from __future__ import annotations

import io
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from rollguard.serving.errors import (
    ArtifactError,
    FrameworkUnavailable,
    InvalidInput,
    ModelExecutionError,
    NotReady,
)
from rollguard.serving.hashing import PinnedBytes
from rollguard.serving.manifest import Manifest
from rollguard.serving.runners.base import IMPORT_LOCK, LocalRunner
from rollguard.serving.tensors import Tensors

if TYPE_CHECKING:
    import torch


def _import_torch(artifact: str) -> ModuleType:
    """The torch module, or FrameworkUnavailable naming the artifact that needs it."""
    try:
        with IMPORT_LOCK:
            import torch
    except ImportError:
        raise FrameworkUnavailable(
            f"{artifact}: framework 'torch' needs PyTorch, which is not installed "
            "(pip install 'rollguard[torch]')"
        ) from None
    return torch


def _last_line(exc: BaseException) -> str:
    # TorchScript errors carry a serialized traceback; the cause is the last line.
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(exc).__name__


class TorchRunner(LocalRunner):
    """Serves a torch module; inputs go positionally in the order model.yaml declares them."""

    def __init__(
        self, manifest: Manifest, directory: Path, pinned: PinnedBytes | None = None
    ) -> None:
        super().__init__(manifest, directory, pinned)
        self._torch: Any = None
        self._module: torch.nn.Module | None = None

    def _load_sync(self) -> None:
        path = self.artifact_path
        torch = _import_torch(path.name)
        # Process-wide: every torch model in this process shares the setting, so the
        # last loaded version's value wins. Keep it small; the executor gives parallelism.
        torch.set_num_threads(int(self.manifest.runtime.get("threads", 1)))
        # The verified buffer, never the path: the file may have changed since it was hashed.
        data = io.BytesIO(self.take_pinned().artifact)
        try:
            with IMPORT_LOCK:  # loading imports what the archive names (torch submodules)
                if path.suffix == ".pt2":
                    module = torch.export.load(data).module()
                else:
                    module = torch.jit.load(data, map_location="cpu")
                    module.eval()  # exported (.pt2) modules refuse eval(); traced as-is
        except Exception as exc:  # torch raises RuntimeError, BadZipFile, pickling errors
            raise ArtifactError(f"{path.name}: torch cannot load it: {_last_line(exc)}") from None
        # A module that ever runs in grad mode cannot later run under inference_mode.
        for param in module.parameters():
            param.requires_grad_(False)
        self._torch = torch
        self._module = module
        self._warm_up(path)

    def _warm_up(self, path: Path) -> None:
        # The first call compiles/specialises; pay for it at load, not on a live request.
        specs = self.manifest.input_specs
        if not specs:
            return
        sample = {s.name: np.zeros([1 if d == -1 else d for d in s.shape], s.dtype) for s in specs}
        try:
            self.predict_sync(sample)
        except (ModelExecutionError, InvalidInput) as exc:
            self._module = None
            raise ArtifactError(
                f"{path.name}: fails on a zero-filled warm-up batch: {exc}"
            ) from None

    def predict_sync(self, inputs: Tensors) -> Tensors:
        module, torch = self._module, self._torch
        if module is None:
            raise NotReady(f"{self.manifest.name} {self.manifest.version} is not loaded")
        names = [t.name for t in self.manifest.inputs] or list(inputs)
        try:
            # from_numpy shares memory and warns on read-only arrays (np.frombuffer): copy those.
            args = [
                torch.from_numpy(a if a.flags.writeable else a.copy())
                for a in (np.ascontiguousarray(inputs[name]) for name in names)
            ]
        except KeyError as exc:
            raise InvalidInput(f"missing input {exc.args[0]!r}") from None
        except TypeError as exc:  # dtypes torch has no tensor type for (e.g. object)
            raise InvalidInput(str(exc)) from None
        try:
            with torch.inference_mode():
                result = module(*args)
                return self._name_outputs(result)
        except ModelExecutionError:
            raise
        except Exception as exc:
            raise ModelExecutionError(_last_line(exc)) from None

    def _name_outputs(self, result: Any) -> Tensors:
        torch = self._torch
        if isinstance(result, dict):
            return {str(k): v.detach().cpu().numpy() for k, v in result.items()}
        values = [result] if isinstance(result, torch.Tensor) else list(result)
        if not all(isinstance(v, torch.Tensor) for v in values):
            raise ModelExecutionError(
                f"the module returned {type(result).__name__}, not a tensor or tuple of tensors"
            )
        declared = [t.name for t in self.manifest.outputs]
        if len(values) < len(declared):
            raise ModelExecutionError(
                f"the module returned {len(values)} output(s), model.yaml declares {declared}"
            )
        names = declared + [f"output_{i}" for i in range(len(declared), len(values))]
        return {name: v.detach().cpu().numpy() for name, v in zip(names, values, strict=True)}

    def _unload_sync(self) -> None:
        self._module = None
