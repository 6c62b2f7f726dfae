"""Makes the order of ``import auto_LiRPA`` and ``import lirpa_deq`` irrelevant.

auto_LiRPA 0.3 cannot be imported on numpy 2 / torch 2 without the pre-import shims of
``lirpa_deq._compat``. The install of lirpa_deq puts ``lirpa_deq_import_hook.pth`` in site-packages;
Python runs its line at start-up, which imports this module. Start-up stays cheap: this module
imports nothing but ``sys`` and only appends a finder to ``sys.meta_path``. The first time anything
imports auto_LiRPA, the finder removes itself, applies ``lirpa_deq._compat.apply_pre_import()``
(each shim is a no-op where the installed torch / numpy / auto_LiRPA do not need it: upstream
auto_LiRPA gets none of 0.3's) and returns None, so the normal finders then import auto_LiRPA.
``_compat`` is loaded as the module ``lirpa_deq._compat`` without running the package's
``__init__`` (which imports auto_LiRPA); a later ``import lirpa_deq`` reuses that module.
"""
import sys


def _apply_pre_import_shims():
    compat = sys.modules.get("lirpa_deq._compat")
    if compat is None:
        import importlib.machinery
        import importlib.util

        package = importlib.util.find_spec("lirpa_deq")  # finds, does not import, the package
        if package is None or not package.submodule_search_locations:
            return  # lirpa_deq was uninstalled: nothing to do
        spec = importlib.machinery.PathFinder.find_spec("lirpa_deq._compat", package.submodule_search_locations)
        if spec is None:
            return
        compat = importlib.util.module_from_spec(spec)
        sys.modules["lirpa_deq._compat"] = compat
        try:
            spec.loader.exec_module(compat)
        except BaseException:
            del sys.modules["lirpa_deq._compat"]
            raise
    compat.apply_pre_import()


class _BeforeAutoLiRPA:
    """A ``sys.meta_path`` finder that never finds anything: it runs the pre-import shims once."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != "auto_LiRPA":
            return None
        if cls in sys.meta_path:
            sys.meta_path.remove(cls)
        try:
            _apply_pre_import_shims()
        except Exception as exc:  # never break an import because of the hook; say what happened
            import warnings

            warnings.warn(f"lirpa_deq could not prepare the auto_LiRPA import ({type(exc).__name__}: {exc}); "
                          "import lirpa_deq before auto_LiRPA", RuntimeWarning, stacklevel=2)
        return None


def install():
    """Put the finder on ``sys.meta_path`` (idempotent; nothing to do once auto_LiRPA is imported)."""
    if "auto_LiRPA" not in sys.modules and _BeforeAutoLiRPA not in sys.meta_path:
        sys.meta_path.insert(0, _BeforeAutoLiRPA)  # ahead of the finders that would find auto_LiRPA


install()
