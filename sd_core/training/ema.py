"""Exponential moving average of a model's trainable parameters: diffusers' ``EMAModel``, by name.

:class:`EMA` is :class:`diffusers.training_utils.EMAModel` (its decay schedule, ``optimization_step``,
``store``/``copy_to``/``restore``) over the parameters that train, with three additions:

* the parameters' names, so that a checkpoint's ``ema.safetensors`` is keyed like its ``model.safetensors``
  (``EMAModel.state_dict`` is a list of tensors with Python scalars beside it, made for ``torch.save``; the
  update count is kept in ``trainer_state.json`` as ``ema_updates``);
* ``warmup=False``: a constant decay (``EMAModel`` always warms up, by ``(1 + n) / (10 + n)`` or by its
  ``inv_gamma``/``power`` rule);
* the update itself is one fused ``torch._foreach_lerp_`` instead of ``EMAModel.step``'s
  ``_foreach_sub`` into a model-sized temporary followed by ``_foreach_sub_``. Measured on the seed's UNet
  (72.9M trainable parameters, 304 tensors, CPU, 1 thread, a shared 2-core VM, 3 rounds of the median of
  15): ``EMAModel.step`` 143–205 ms against 63–77 ms for the lerp; the 80–130 ms more are 4–7 % of a training
  step there (1.8–2.2 CPU seconds, ``benchmarks/train.py store --sizes seed``). On a GPU it is twice the memory
  traffic (6 passes over the weights instead of 3). The same arithmetic
  (``shadow += (1 - decay) · (param - shadow)``) up to rounding.

With ``warmup`` the decay for the ``k``-th update (``k = optimization_step``, from 1) is diffusers'
``min(decay, (1 + n) / (10 + n))`` with ``n = k - 1``, except that the first update copies the weights
(decay 0). ``optimization_step = 0`` restarts the warm-up (a continuation on new data).
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from diffusers.training_utils import EMAModel
from torch import nn


class EMA(EMAModel):
    """float32 shadow copies of ``model``'s trainable parameters, on the parameters' device."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True) -> None:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        super().__init__(self.params, decay=decay, foreach=True)
        self.warmup = warmup

    def get_decay(self, optimization_step: int) -> float:
        return super().get_decay(optimization_step) if self.warmup else self.decay

    @torch.no_grad()
    def step(self, parameters: Iterable[torch.nn.Parameter] | None = None) -> None:
        """One update from ``parameters`` (the tracked ones by default); see the module docstring for why
        this is a lerp rather than ``EMAModel.step``."""
        params = self.params if parameters is None else list(parameters)
        self.optimization_step += 1
        self.cur_decay_value = self.get_decay(self.optimization_step)
        torch._foreach_lerp_(self.shadow_params, [p.detach() for p in params], 1.0 - self.cur_decay_value)

    def shadow_state(self) -> dict[str, torch.Tensor]:
        """The averaged weights by parameter name (what ``ema.safetensors`` holds)."""
        return dict(zip(self.names, self.shadow_params))

    def load_shadow_state(self, state: dict[str, torch.Tensor], optimization_step: int) -> None:
        """Put ``state`` (by parameter name, as :meth:`shadow_state` gives it) and the update count back."""
        if state.keys() != set(self.names):
            raise KeyError("EMA state does not match the model's trainable parameters")
        with torch.no_grad():
            for shadow, n in zip(self.shadow_params, self.names):
                shadow.copy_(state[n])
        self.optimization_step = optimization_step

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The EMA weights in the model's parameters for the block (``store``, ``copy_to``, ``restore``)."""
        self.store(self.params)
        self.copy_to(self.params)
        try:
            yield
        finally:
            self.restore(self.params)
