"""The one place that knows about versions: bridges auto_LiRPA (0.3 from PyPI, or upstream >= 0.6)
to the installed torch (2.x) and numpy (1.x / 2.x).

Everything here is feature-detected (``hasattr`` / signature checks on torch and numpy, and what the
installed auto_LiRPA's own sources use), applied once on ``import lirpa_deq``, and is a no-op where
the installed versions do not need it. Each shim is
named; ``LIRPA_DEQ_DISABLE_SHIMS=name1,name2`` switches individual shims off, which is how the test
suite proves that every shim is needed (a shim that nothing needs is deleted).

Two phases:
* ``PRE_IMPORT`` shims patch torch / numpy before auto_LiRPA is imported (its module-level imports
  would fail otherwise). They also run when the user imports auto_LiRPA BEFORE lirpa_deq: the
  install ships ``_lirpa_deq_import_hook`` (started by a ``.pth`` file), which calls
  :func:`apply_pre_import` the first time anything imports auto_LiRPA -- so this module must not
  import auto_LiRPA at module level;
* ``POST_IMPORT`` shims patch auto_LiRPA classes after import (work-arounds for 0.3 bugs on the paths
  lirpa_deq uses).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import os
import sys
import types
import warnings

import numpy as np
import torch

DISABLED = {s.strip() for s in os.environ.get("LIRPA_DEQ_DISABLE_SHIMS", "").split(",") if s.strip()}
APPLIED: list[str] = []  # names of shims that were needed and applied, for diagnostics


def _shim(name):
    """Register ``fn`` as shim ``name``; it returns True when it patched something."""

    def wrap(fn):
        @functools.wraps(fn)
        def run():
            if name in DISABLED:
                return
            if fn():
                APPLIED.append(name)

        run.shim_name = name
        return run

    return wrap


def _onnx_globals():
    """torch's ONNX exporter globals object (moved under ``_internal.torchscript_exporter`` in 2.9)."""
    for mod in ("torch.onnx._internal.torchscript_exporter._globals", "torch.onnx._globals"):
        try:
            return __import__(mod, fromlist=["GLOBALS"]).GLOBALS
        except ImportError:
            continue
    return None


@functools.lru_cache(maxsize=1)
def _auto_lirpa_source() -> str:
    """The text of the installed auto_LiRPA's Python files, found WITHOUT importing it (the
    pre-import shims must decide before its import); '' where auto_LiRPA is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("auto_LiRPA")
    if spec is None or not spec.submodule_search_locations:
        return ""
    texts = []
    for root in spec.submodule_search_locations:
        for folder, _, files in os.walk(root):
            for name in sorted(files):
                if name.endswith(".py"):
                    with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as handle:
                        texts.append(handle.read())
    return "\n".join(texts)


# --------------------------------------------------------------------------------------- pre-import
@_shim("numpy_arraysetops")
def _numpy_arraysetops():
    # numpy 2.0 removed the numpy.lib.arraysetops module; auto_LiRPA 0.3 imports `isin` from it.
    if "numpy.lib.arraysetops" not in _auto_lirpa_source():
        return False
    try:
        import numpy.lib.arraysetops  # noqa: F401
        return False
    except ImportError:
        mod = types.ModuleType("numpy.lib.arraysetops")
        mod.isin = np.isin
        sys.modules["numpy.lib.arraysetops"] = mod
        return True


@_shim("set_opset_version")
def _set_opset_version():
    # torch 2.x removed symbolic_helper._set_opset_version; 0.3 calls it to export at opset 12.
    # A no-op is not enough: Unsqueeze/ReduceSum change form above opset 12.
    # (Upstream imports it only under torch < 2, inside a function: not needed there.)
    import re

    import torch.onnx.symbolic_helper as helper

    module_level_import = r"(?m)^from torch\.onnx\.symbolic_helper import _set_opset_version"
    if hasattr(helper, "_set_opset_version") or not re.search(module_level_import, _auto_lirpa_source()):
        return False
    globals_ = _onnx_globals()

    def _set(opset_version):
        globals_.export_onnx_opset_version = opset_version

    helper._set_opset_version = _set
    return True


@_shim("node_getitem")
def _node_getitem():
    # torch 1.13 removed torch._C.Node.__getitem__ (attribute access by name); 0.3 uses node[key].
    # Upstream reads attributes through symbolic_helper._node_get where torch has it.
    import torch.onnx.symbolic_helper as helper

    uses_node_get = "_node_get" in _auto_lirpa_source() and hasattr(helper, "_node_get")
    if hasattr(torch._C.Node, "__getitem__") or uses_node_get:
        return False
    torch._C.Node.__getitem__ = lambda node, key: getattr(node, node.kindOf(key))(key)
    return True


@_shim("symbolic_registration")
def _symbolic_registration():
    # torch >= 2.9 registers only the default opset's symbolic functions on import; auto_LiRPA
    # exports at an older opset (12), so without this Pad/Resize take their old form (and upstream
    # auto_LiRPA 0.7 even gives unsound CROWN bounds for x**2). Trigger the full registration.
    try:
        from torch.onnx._internal.torchscript_exporter import utils as exporter_utils
    except ImportError:
        return False
    trigger = getattr(exporter_utils, "_trigger_symbolic_function_registration", None)
    if trigger is None:
        return False
    trigger()
    return True


PRE_IMPORT = [_numpy_arraysetops, _set_opset_version, _node_getitem,
              _symbolic_registration]


# -------------------------------------------------------------------------------------- post-import
@_shim("named_members_remove_duplicate")
def _named_members_remove_duplicate():
    # torch 2.0 passes remove_duplicate= to Module._named_members; 0.3's BoundedModule overrides it
    # without that keyword (it already de-duplicates through its memo set).
    from auto_LiRPA import BoundedModule

    original = BoundedModule._named_members
    if "remove_duplicate" in inspect.signature(original).parameters:
        return False

    @functools.wraps(original)
    def _named_members(self, get_members_fn, prefix="", recurse=True, remove_duplicate=True):
        return original(self, get_members_fn, prefix=prefix, recurse=recurse)

    BoundedModule._named_members = _named_members
    return True


@_shim("add_sub_patches_mode")
def _add_sub_patches_mode():
    # 0.3 keeps BoundAdd/BoundSub in conv_mode 'patches' even on 2-D tensors, and then builds an
    # identity Patches spec for them (crashes CROWN on cells like relu(Wz + Ux)). Upstream (>= 0.4)
    # guards that branch with len(output_shape) >= 4; mirror that by reporting 'matrix' below 4-D.
    from auto_LiRPA.operators import BoundAdd, BoundSub

    if _upstream_sparse_specs():
        return False

    def get_mode(node):
        shape = getattr(node, "output_shape", None)
        if shape is not None and len(shape) < 4:
            return "matrix"
        return node.__dict__.get("_conv_mode", "matrix")

    def set_mode(node, value):
        node.__dict__["_conv_mode"] = value

    for cls in (BoundAdd, BoundSub):
        cls.mode = property(get_mode, set_mode)
    return True


def _upstream_sparse_specs():
    """True when auto_LiRPA is upstream (>= 0.4): its ``get_sparse_C`` guards the Add/Sub branch."""
    from auto_LiRPA import backward_bound

    return "len(node.output_shape) >= 4" in inspect.getsource(backward_bound.get_sparse_C)


@_shim("dense_specs_on_add_nodes")
def _dense_specs_on_add_nodes():
    # 0.3's sparse intermediate specifications (CROWN only for the neurons that the IBP reference
    # bounds call unstable) give UNSOUND bounds on Add / Sub nodes, e.g. s = W z + U x in an
    # unrolled relu(Wz + Ux) cell (caught by tests/compat_probes.py: relu_affine_sound; upstream is
    # sound there). Give exactly those nodes dense specifications; every other node keeps 0.3's
    # sparse path (the bounds of neurons left out are their IBP reference bounds, which fix the
    # same, stable, ReLU relaxation).
    from auto_LiRPA import BoundedModule
    from auto_LiRPA.operators import BoundAdd, BoundSub

    if _upstream_sparse_specs():
        return False
    original = BoundedModule.get_sparse_C

    @functools.wraps(original)
    def get_sparse_C(self, node, sparse_intermediate_bounds=True, *args, **kwargs):
        if isinstance(node, (BoundAdd, BoundSub)):
            sparse_intermediate_bounds = False
        return original(self, node, sparse_intermediate_bounds, *args, **kwargs)

    BoundedModule.get_sparse_C = get_sparse_C
    # alpha-CROWN's slopes for such a start node must then be dense too (0.3 would create them for
    # its unstable neurons only and then refuse the dense specification: an AssertionError)
    _dense_alpha_for(lambda self, name, idx: isinstance(self[name], (BoundAdd, BoundSub)))
    return True


def _dense_alpha_for(rule):
    """Make 0.3's alpha-CROWN create DENSE slopes (unstable_idx None) for the start nodes where
    ``rule(bounded_module, name, unstable_idx)`` holds (wraps ``get_alpha_crown_start_nodes``)."""
    from auto_LiRPA import BoundedModule

    original = BoundedModule.get_alpha_crown_start_nodes

    @functools.wraps(original)
    def get_alpha_crown_start_nodes(self, *args, **kwargs):
        return [(name, size, None if idx is not None and rule(self, name, idx) else idx)
                for name, size, idx in original(self, *args, **kwargs)]

    BoundedModule.get_alpha_crown_start_nodes = get_alpha_crown_start_nodes


@_shim("sparse_alpha_no_unstable")
def _sparse_alpha_no_unstable():
    # 0.3's alpha-CROWN gives a start node with NO unstable neuron (at initialization) sparse slopes
    # of size 1, and then fails an assertion in BoundRelu.bound_backward as soon as a later
    # iteration finds unstable neurons there (upstream creates them differently). Give such start
    # nodes dense slopes; any slope in [0, 1] is sound, this only changes how they are stored.
    if _upstream_sparse_specs():
        return False

    def empty(self, name, idx):
        return (idx.numel() if isinstance(idx, torch.Tensor) else idx[0].numel()) == 0

    _dense_alpha_for(empty)
    return True


@_shim("maxpool_alpha_spec")
def _maxpool_alpha_spec():
    # alpha-CROWN in 0.3 builds MaxPool's alpha as torch.empty([1, spec_size, ...]) where the spec
    # size of a matrix-mode start node is a torch.Size (torch 2 refuses a Size inside a size list);
    # upstream passes an int. Flatten the spec size. (0.3 still rejects MaxPool alpha in conv_mode
    # 'patches'; use bound_opts={'conv_mode': 'matrix'} there.)
    from auto_LiRPA.operators import BoundMaxPool

    if hasattr(BoundMaxPool, "_init_opt_parameters_impl") or "init_opt_parameters" not in vars(BoundMaxPool):
        return False  # upstream builds MaxPool alpha in _init_opt_parameters_impl with an int spec
    original = BoundMaxPool.init_opt_parameters

    @functools.wraps(original)
    def init_opt_parameters(self, start_nodes):
        flat = [(name, int(np.prod(size)) if isinstance(size, (tuple, list)) else size, idx)
                for name, size, idx in start_nodes]
        return original(self, flat)

    BoundMaxPool.init_opt_parameters = init_opt_parameters
    return True


@_shim("avgpool_view")
def _avgpool_view():
    # 0.3's BoundAveragePool.bound_backward calls .view on a padded, non-contiguous A (fails for
    # pooling whose kernel does not tile the input, e.g. AvgPool4 on 7x7 or 8x8 after convs).
    # Upstream reshapes; hand it a contiguous A and let `view` copy-free succeed.
    from auto_LiRPA.operators import BoundAveragePool

    original = BoundAveragePool.bound_backward
    if "F.pad(next_A" not in inspect.getsource(original):
        return False

    @functools.wraps(original)
    def bound_backward(self, last_lA, last_uA, x, *args, **kwargs):
        last_lA = last_lA.contiguous() if isinstance(last_lA, torch.Tensor) else last_lA
        last_uA = last_uA.contiguous() if isinstance(last_uA, torch.Tensor) else last_uA
        return original(self, last_lA, last_uA, x, *args, **kwargs)

    BoundAveragePool.bound_backward = bound_backward
    return True


@_shim("sigmoid_table_dtype")
def _sigmoid_table_dtype():
    # 0.3 precomputes the tangent-point tables of tanh / sigmoid relaxations in float32 and mixes
    # them into float64 bounds (index_put dtype error in CROWN of float64 models); cast the tables
    # to the bound's dtype (widening float32 -> float64 keeps every tangent point exactly).
    from auto_LiRPA.operators import BoundTanh

    original = BoundTanh.bound_relax_impl
    if "d_lower.to(" in inspect.getsource(original) or not hasattr(BoundTanh, "precompute_relaxation"):
        return False

    @functools.wraps(original)
    def bound_relax_impl(self, x, func, dfunc):
        dtype = x.lower.dtype
        for name in ("d_lower", "d_upper"):
            table = getattr(self, name, None)
            if isinstance(table, torch.Tensor) and table.dtype != dtype:
                setattr(self, name, table.to(dtype))
        return original(self, x, func, dfunc)

    BoundTanh.bound_relax_impl = bound_relax_impl
    return True


def _in_parameter_dtype(cls, name):
    """Wrap method ``name`` of ``cls`` (a BoundedModule method) to run with the default dtype set
    to the dtype of the module's parameters (no-op for float32 models or models without any)."""
    original = getattr(cls, name)

    @functools.wraps(original)
    def method(self, *args, **kwargs):
        param = next(iter(self.parameters()), None)
        if param is None or not param.is_floating_point() or param.dtype == torch.get_default_dtype():
            return original(self, *args, **kwargs)
        with default_dtype(param.dtype):
            return original(self, *args, **kwargs)

    setattr(cls, name, method)


@_shim("sparse_c_dtype")
def _sparse_c_dtype():
    # Upstream's get_sparse_C builds the identity / one-hot specification of intermediate bounds
    # in the default dtype (float32), and CROWN of a float64 model then mixes dtypes (conv in
    # conv_mode 'matrix' fails). 0.3 passes the parameters' dtype. Build it in that dtype.
    from auto_LiRPA import BoundedModule, backward_bound

    if "torch.eye(dim, device=self.device)" not in inspect.getsource(backward_bound.get_sparse_C):
        return False
    _in_parameter_dtype(BoundedModule, "get_sparse_C")
    return True


@_shim("optimized_bounds_dtype")
def _optimized_bounds_dtype():
    # alpha-CROWN casts its best bounds to the default dtype in the last iteration: float64 models
    # get float32 bounds (rounded to nearest: not a sound float64 bound), and upstream then fails
    # when a later update writes float64 into them (compute_jacobian_bounds of float64 models).
    from auto_LiRPA import BoundedModule

    name = "_get_optimized_bounds" if hasattr(BoundedModule, "_get_optimized_bounds") else "get_optimized_bounds"
    if "best_ret[0].to(torch.get_default_dtype())" not in inspect.getsource(getattr(BoundedModule, name)):
        return False
    _in_parameter_dtype(BoundedModule, name)
    return True


@_shim("jacobian_dtype")
def _jacobian_dtype():
    # Upstream's Jacobian graph (compute_jacobian_bounds) is traced from a float32 example gradient
    # (its weights become float32 constants) and starts from a float32 identity: float64 models
    # fail at the first matmul. Trace and start it in the model's / input's dtype.
    import auto_LiRPA.operators as ops
    from auto_LiRPA import BoundedModule

    init = getattr(ops, "BoundJacobianInit", None)
    if init is None or "torch.eye(dim, device=x.device," not in inspect.getsource(init.forward):
        return False
    _in_parameter_dtype(BoundedModule, "_expand_jacobian")
    original = init.forward

    @functools.wraps(original)
    def forward(self, x):
        with default_dtype(x.dtype if x.is_floating_point() else torch.get_default_dtype()):
            return original(self, x)

    init.forward = forward
    return True


POST_IMPORT = [_named_members_remove_duplicate, _add_sub_patches_mode, _dense_specs_on_add_nodes,
               _sparse_alpha_no_unstable, _maxpool_alpha_spec, _avgpool_view, _sigmoid_table_dtype,
               _sparse_c_dtype, _optimized_bounds_dtype, _jacobian_dtype]


def apply_pre_import():
    """Apply the shims that must be in place before auto_LiRPA is imported (idempotent; imports
    torch and numpy, never auto_LiRPA)."""
    if getattr(apply_pre_import, "done", False):
        return
    apply_pre_import.done = True  # first: a shim's find_spec('auto_LiRPA') re-enters through the hook
    for shim in PRE_IMPORT:
        shim()


def apply():
    """Apply every shim that the installed versions need, importing auto_LiRPA (idempotent)."""
    if getattr(apply, "done", False):
        return
    apply_pre_import()
    # auto_LiRPA 0.3 switches the global warning filters to "once" and decorates functions with
    # torch.jit.script (deprecated in torch 2.x); keep both out of the user's session
    # (it resets filters inside the import, so record what is emitted and re-issue the rest)
    with warnings.catch_warnings(record=True) as caught:
        import auto_LiRPA  # noqa: F401  (imported only after the pre-import shims)
    for w in caught:
        if not (issubclass(w.category, DeprecationWarning) and "torch.jit.script" in str(w.message)):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)

    for shim in POST_IMPORT:
        shim()
    apply.done = True


# ------------------------------------------------------------------------------ operator classes
def bound_classes(*names):
    """The auto_LiRPA operator classes of these names that the installed version has, as a tuple
    for ``isinstance`` (versions add and rename operators; a missing name is simply left out)."""
    import auto_LiRPA.operators as ops

    return tuple(cls for cls in (getattr(ops, name, None) for name in names) if isinstance(cls, type))


def dense_coefficients(last_A, state_shape):
    """auto_LiRPA's coefficients on a node -- a Tensor (spec, batch, *state) or, in conv mode
    'patches', a ``Patches`` object -- as a dense (spec, batch, *state) tensor. Patches are expanded
    as auto_LiRPA's own BoundReshape does (``patches_to_matrix`` gives (batch, spec, *state))."""
    from auto_LiRPA.patches import Patches, patches_to_matrix

    if not isinstance(last_A, Patches):
        return last_A
    dense = patches_to_matrix(last_A.patches, state_shape[1:], last_A.stride, last_A.padding,
                              last_A.output_shape, last_A.unstable_idx)
    return dense.transpose(0, 1)


@contextlib.contextmanager
def default_dtype(dtype):
    """auto_LiRPA creates some specification tensors in the default dtype (upstream: float32
    intermediate specifications of ReLU nodes); a float64 cell needs them in float64."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def gemm_scale(node):
    """|alpha| of an ONNX Gemm (Y = alpha A B + beta C): ``alpha_linear`` upstream, ``alpha`` in 0.3
    (upstream's ``alpha`` is the dict of alpha-CROWN slopes)."""
    for name in ("alpha_linear", "alpha"):
        value = getattr(node, name, None)
        if isinstance(value, (int, float)) or (isinstance(value, torch.Tensor) and value.numel() == 1):
            return abs(float(value))
    return 1.0


# ------------------------------------------------------------------------------------ module state
def copy_buffers(bounded, model, into: str) -> None:
    """Copy buffers (BN running statistics) between a BoundedModule and the ``model`` it was
    built from, in place: ``into='model'`` (after training steps on ``bounded``) or
    ``into='bounded'`` (after loading ``model`` from a checkpoint). Parameters need no copy: they
    are shared. Matches by ``bounded.named_buffers()``, which keeps the model's names in every
    version (upstream's ``state_dict`` keys are node names such as '/5.buffer', so a
    ``load_state_dict`` / key lookup between the two matches nothing). Every buffer of ``bounded``
    must have a same-named, same-shaped buffer in ``model``: RuntimeError naming it otherwise."""
    if into not in ("model", "bounded"):
        raise ValueError(f"into must be 'model' or 'bounded', got {into!r}")
    targets = dict(model.named_buffers())
    with torch.no_grad():
        for name, buf in bounded.named_buffers():
            other = targets.get(name)
            if other is None or other.shape != buf.shape:
                found = "missing" if other is None else f"of shape {tuple(other.shape)}"
                raise RuntimeError(f"buffer {name!r} {tuple(buf.shape)} of the BoundedModule has no counterpart "
                                   f"in the model ({found}): was the BoundedModule built from this model?")
            destination, source = (other, buf) if into == "model" else (buf, other)
            if destination.data_ptr() != source.data_ptr():
                destination.copy_(source)


# ------------------------------------------------- optimizable custom nodes (alpha-CROWN)
def optimizable_node_base():
    """auto_LiRPA's base class of nodes whose ``alpha`` its alpha-CROWN optimizes (0.3 and upstream
    collect them by ``isinstance(node, BoundOptimizableActivation)``), or plain ``Bound`` when the
    installed version has none."""
    import auto_LiRPA.operators as ops

    return getattr(ops, "BoundOptimizableActivation", None) or ops.Bound


def start_node_entry(entry):
    """(name, size) of one start node passed to ``init_opt_parameters``: 0.3 passes
    (name, size, unstable_idx), upstream (name, size, unstable_idx, is_final)."""
    return entry[0], entry[1]


ALL_SHIMS = [s.shim_name for s in PRE_IMPORT + POST_IMPORT]
