"""Parking: holding inactive weights at exactly zero through a fused Adam / AdamW's optimizer state.

A mixin of :class:`slaknet.sparse.SparseEngine` (it uses the engine's layers, optimizer and config); see
docs/sparse.md, "How the zeros are kept", for what is checked when, and what it costs.
"""
from __future__ import annotations

import logging
import weakref
from typing import TYPE_CHECKING, Any, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn

from slaknet.sparse.bits import INF_BITS as _INF_BITS
from slaknet.sparse.bits import any_nonfinite_where as _any_nonfinite_where
from slaknet.sparse.bits import any_nonzero_where as _any_nonzero_where
from slaknet.sparse.bits import edit_bits_ as _edit_bits_
from slaknet.sparse.bits import zero_inactive_ as _zero_inactive_

if TYPE_CHECKING:
    from slaknet.sparse.engine import SparseLayer

logger = logging.getLogger("slaknet.sparse")

# Adam's denominators: +inf here makes the update of a weight exactly 0 (see ParkingMixin._park)
SECOND_MOMENT_KEYS = ("exp_avg_sq", "max_exp_avg_sq")


class _Parked(NamedTuple):
    """A parked layer: its +inf-holding second moments, and the version counters of everything that
    could move its inactive weights (weight, state tensors) as they were after the engine's last edit."""

    slots: Tuple[torch.Tensor, ...]
    watched: Tuple[torch.Tensor, ...]
    versions: Tuple[int, ...]


class ParkingMixin:
    """The engine's parking, rewrite detection and non-finite guard (state lives on the engine)."""

    layers: List[Any]
    optimizer: Optional[torch.optim.Optimizer]
    model: nn.Module
    _parked: Dict[str, _Parked]

    # Keeping inactive weights at zero without a pass ("parking"). With Adam / AdamW the change of a weight
    # in one step is  -lr * wd * w - step_size * m / (sqrt(v) / c + eps): with w == 0 and v == +inf it is
    # exactly 0 for any finite first moment m (IEEE: x / inf == 0), so an inactive weight stays exactly zero
    # without being touched, while m keeps following the dense gradient (what momentum growth ranks by).
    # torch's fused CPU kernel computes sqrt(inf) at full speed (its for-loop / foreach paths take a slow
    # path on inf, ~3x for the whole step), so only fused Adam / AdamW on CPU are parked. The per-step
    # cost is then an identity check of the state tensors instead of a pass over every sparse weight
    # (bandwidth-bound: ~20-30 ms per step for SLaK-T on one CPU thread).
    def _park_slots(self, layer: SparseLayer) -> Optional[Tuple[torch.Tensor, ...]]:
        """The second-moment state tensors through which ``layer`` can be parked, or None."""
        opt = self.optimizer
        if (self._park_disabled or opt is None or self.config.masking != "auto"
                or self.config.optimizer_state != "zero" or type(opt) not in (torch.optim.Adam, torch.optim.AdamW)
                or layer.param.device.type != "cpu" or layer.param.dtype not in _INF_BITS):
            return None
        if not any(g.get("fused") for g in opt.param_groups):  # cheap exit, checked every step otherwise
            return None
        group = next((g for g in opt.param_groups if any(q is layer.param for q in g["params"])), None)
        if group is None or not group.get("fused") or group.get("differentiable"):
            return None
        slots = self._state_slots(layer)
        return slots if slots and all(v.dtype == layer.param.dtype for v in slots) else None

    def _state_slots(self, layer: SparseLayer) -> Tuple[torch.Tensor, ...]:
        st = self.optimizer.state.get(layer.param) or {}
        return tuple(st[k] for k in SECOND_MOMENT_KEYS
                     if torch.is_tensor(st.get(k)) and st[k].shape == layer.param.shape)

    def _still_parked(self, layer: SparseLayer) -> bool:
        """O(1): is ``layer`` parked, with the same state tensors, none written in place since the last step?

        The fused step itself does not bump version counters; a rewrite of the weight or of its state by
        other code (``fill_``, ``copy_``, ``load_state_dict`` into the model) does, and sends the layer
        through the re-masking pass right after the step that used it.
        """
        held = self._parked.get(layer.name)
        if held is None or self._park_disabled:
            return False
        now = self._state_slots(layer)  # the optimizer may have replaced its state (load_state_dict)
        if not (len(now) == len(held.slots) and all(a is b for a, b in zip(now, held.slots))):
            return False
        if tuple(t._version for t in held.watched) == held.versions:
            return True
        if layer.name not in self._warned_rewrite:
            self._warned_rewrite.add(layer.name)
            logger.warning("sparse engine: the weight or optimizer state of %r was written in place between steps; "
                           "its inactive weights are re-masked after this step", layer.name)
        return False

    def _watch(self, layer: SparseLayer, slots: Tuple[torch.Tensor, ...]) -> _Parked:
        st = self.optimizer.state.get(layer.param) or {}
        watched = (layer.param,) + tuple(v for v in st.values() if torch.is_tensor(v) and v.shape == layer.param.shape)
        return _Parked(slots, watched, tuple(t._version for t in watched))

    def _refresh_versions(self) -> None:
        """Record version counters after the engine's own edits (they are not rewrites by others)."""
        for name, held in self._parked.items():
            self._parked[name] = held._replace(versions=tuple(t._version for t in held.watched))

    @torch.no_grad()
    def _park(self, layer: SparseLayer) -> None:
        """Hold ``layer``'s inactive weights at zero through its optimizer state, if the optimizer allows.

        Second moments become +inf at inactive positions. An active position found at +inf (masks that
        changed under a parked state, e.g. a sparse state loaded over another run's optimizer state)
        restarts like a regrown weight: its moments are zeroed. Non-finite first moments at inactive
        positions (a non-finite gradient there) are zeroed too: m / inf would be NaN.
        """
        slots = self._park_slots(layer)
        if slots is None:
            self._parked.pop(layer.name, None)
            return
        stale = torch.zeros_like(layer.mask)
        for v in slots:
            stale |= torch.isinf(v) & layer.mask
        st = self.optimizer.state[layer.param]
        floats = [v for v in st.values() if torch.is_tensor(v) and v.shape == layer.param.shape
                  and v.is_floating_point() and not any(v is t for t in slots)]
        if bool(stale.any()):
            for v in floats + list(slots):
                v.masked_fill_(stale, 0)
        for v in floats:
            if _any_nonfinite_where(v, ~layer.mask):
                v.masked_fill_(~torch.isfinite(v) & ~layer.mask, 0)
        for v in slots:
            _edit_bits_(v, keep=layer.mask, to_inf=~layer.mask)
        self._parked[layer.name] = self._watch(layer, slots)

    @torch.no_grad()
    def _unpark_all(self) -> None:
        """Give every parked layer finite optimizer state back (+inf second moments at inactive positions
        become 0) and stop parking: used by :meth:`detach` and when the optimizer changes."""
        for layer in self.layers:
            if layer.name in self._parked and self.optimizer is not None:
                slots = self._state_slots(layer)
                if len(slots) == len(self._parked[layer.name].slots) and all(
                        a is b for a, b in zip(slots, self._parked[layer.name].slots)):
                    for v in slots:
                        _edit_bits_(v, keep=layer.mask)
        self._parked.clear()
        self._install_guard()  # nothing parked: removes the forward guard

    @torch.no_grad()
    def _remask(self) -> None:
        """After a step: zero the inactive weights of every layer that is not parked, then try to park it."""
        for layer in self.layers:
            if self._still_parked(layer):
                continue
            _zero_inactive_(layer.param.data, layer.mask)
            self._park(layer)  # a no-op unless the optimizer allows parking (see _park_slots)
        self._install_guard()

    # A non-finite gradient at a parked (inactive) position makes m / inf = NaN in the weight. Finding it
    # right after the step would take a pass over the gradients (~2 % of a SLaK-T step), so it is found where
    # it shows, for the cost of a check of the model's output: a NaN weight makes the next forward's output
    # non-finite. Then (rarely) the parked layers are scanned, non-finite inactive weights and first moments
    # are zeroed, the buffers the forward touched (BatchNorm statistics) are restored and the forward runs
    # again, so the caller gets the output it would have got with the re-masking pass.
    def _install_guard(self) -> None:
        if not self._parked or self._guard is not None:
            if not self._parked and self._guard is not None:
                for h in self._guard:
                    h.remove()
                self._guard = None
            return
        ref, root = weakref.ref(self), self.model  # plain closures: a deepcopy of the model (EMA) copies no engine

        def pre(module: nn.Module, args: Any, kwargs: Any) -> None:
            eng = ref()
            if eng is not None and module is root and not eng._rerun and eng._parked:
                eng._snapshot_buffers()

        def post(module: nn.Module, args: Any, kwargs: Any, out: Any) -> Any:
            eng = ref()
            if eng is None or module is not root or eng._rerun or not eng._parked:
                return None
            return eng._guard_output(module, args, kwargs, out)

        self._guard = (root.register_forward_pre_hook(pre, with_kwargs=True),
                       root.register_forward_hook(post, with_kwargs=True))

    @torch.no_grad()
    def _snapshot_buffers(self) -> None:
        bufs = list(self.model.buffers())
        if (len(bufs) != len(self._buffer_copy)
                or any(a.shape != b.shape or a.dtype != b.dtype for a, b in zip(bufs, self._buffer_copy))):
            self._buffer_copy = [b.detach().clone() for b in bufs]
        elif bufs:
            torch._foreach_copy_(self._buffer_copy, bufs)
        self._buffers = bufs

    def _guard_output(self, module: nn.Module, args: Any, kwargs: Any, out: Any) -> Any:
        t = out if torch.is_tensor(out) else (out[0] if isinstance(out, (tuple, list)) and out else None)
        if not torch.is_tensor(t) or not t.is_floating_point() or bool(torch.isfinite(t.detach()).all()):
            return None
        if not self.repair_nonfinite():
            return None  # the model itself diverged: nothing of the engine's to repair
        with torch.no_grad():
            for b, c in zip(self._buffers, self._buffer_copy):
                b.copy_(c)
        self._rerun = True
        try:
            return module(*args, **kwargs)
        finally:
            self._rerun = False

    @torch.no_grad()
    def repair_nonfinite(self) -> List[str]:
        """Zero NaN / inf at inactive weights of parked layers (and non-finite first moments there).

        Called automatically when a forward's output is non-finite; returns the repaired layers' names.
        """
        bad = []
        for layer in self.layers:
            if layer.name in self._parked and _any_nonfinite_where(layer.param.detach(), ~layer.mask):
                _zero_inactive_(layer.param.data, layer.mask)
                self._park(layer)
                bad.append(layer.name)
        if bad:
            logger.warning("sparse engine: a non-finite gradient at inactive weights of %d parked layers (%s...) "
                           "made them NaN; zeroed them and their optimizer state and ran the forward again",
                           len(bad), bad[0])
        self._refresh_versions()
        return bad

    def _check_all_parked(self) -> None:
        for layer in [l for l in self.layers if self._still_parked(l)]:
            self._check_parked(layer)

    @torch.no_grad()
    def _check_parked(self, layer: SparseLayer) -> None:
        """At an update (or every ``u`` steps): verify that a parked layer's inactive weights stayed zero.

        Rewrites that bump version counters are caught at the next step (:meth:`_still_parked`); one that
        does not (a write through ``.data``) is caught here: the weights are zeroed, parking is switched off
        for the rest of the run (every step re-masks) and a warning says so.
        """
        if not _any_nonzero_where(layer.param.detach(), ~layer.mask):
            return
        _zero_inactive_(layer.param.data, layer.mask)
        logger.warning("sparse engine: inactive weights of %r had become non-zero although their optimizer state "
                       "held them at zero (was the optimizer state modified in place?); re-masking after every "
                       "step from now on", layer.name)
        self._park_disabled = True
        self._parked.clear()

