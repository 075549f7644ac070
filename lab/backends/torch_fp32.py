"""torch: the .pth state_dict in the registry's architecture, eager PyTorch, fp32.

The model is wrapped in the same models.tta module the export used, so it computes what the ONNX
graphs compute. torch is imported only when this backend is built."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lab.backends.base import Backend, BackendUnavailable, register_backend


def torch_device() -> str:
    """$LAB_TORCH_DEVICE, else cuda where present, else cpu."""
    import torch

    return os.environ.get("LAB_TORCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


@register_backend
class TorchBackend(Backend):
    name = "torch"
    file = "model.pth"
    description = "PyTorch eager, fp32"
    precision = "fp32"

    @classmethod
    def check_available(cls) -> None:
        try:
            import torch  # noqa: F401
        except Exception as e:  # ImportError, or a broken install
            raise BackendUnavailable(f"torch cannot be imported ({type(e).__name__}: {e})") from None

    @classmethod
    def devices(cls) -> list[str]:
        return [torch_device()]

    def __init__(self, path: Path, card, threads: int | None = None, channels_last: bool = True):
        import torch

        from models import create_model, with_tta

        self.torch = torch
        if threads:
            torch.set_num_threads(threads)
        net = create_model(card.architecture.name, **card.architecture.kwargs)
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.device = torch.device(torch_device())
        self.model = with_tta(net, card.tta_level).eval().to(self.device)
        self.channels_last = channels_last and any(isinstance(m, torch.nn.Conv2d) for m in net.modules())
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.threads = torch.get_num_threads()

    def predict(self, batch: np.ndarray) -> np.ndarray:
        torch = self.torch
        x = torch.from_numpy(np.ascontiguousarray(batch, np.float32)).to(self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                                     enabled=self.precision == "bf16"):
            return self.model(x).float().cpu().numpy()
