"""docs/api.md is generated from the code (docs/gen_api.py) and must be current; every public name
is documented."""
import importlib.util
import inspect
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_gen_api():
    spec = importlib.util.spec_from_file_location("gen_api", ROOT / "docs" / "gen_api.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_api_md_is_up_to_date():
    gen = load_gen_api()
    text = gen.generate()
    current = (ROOT / "docs" / "api.md").read_text()
    assert current == text, ("docs/api.md is out of date with the code: run "
                             "`.venv/bin/python docs/gen_api.py` and commit docs/api.md")


def test_every_public_name_has_a_docstring():
    gen = load_gen_api()
    missing = gen.missing_docstrings()
    # The only exceptions are listed, with a description, in gen_api.MISSING_DOC_NOTES (names
    # whose source has no docstring yet); anything else must carry its own docstring.
    unexplained = sorted(set(missing) - set(gen.MISSING_DOC_NOTES))
    assert not unexplained, f"public names without a docstring: {unexplained}"
    stale = sorted(set(gen.MISSING_DOC_NOTES) - set(missing))
    assert not stale, f"these names have docstrings now; drop them from MISSING_DOC_NOTES: {stale}"
    assert not gen.undocumented_constants(), "describe these constants in gen_api.CONSTANTS"


def test_every_public_name_is_in_api_md():
    gen = load_gen_api()
    text = (ROOT / "docs" / "api.md").read_text()
    for modname, _, _ in gen.MODULES:
        mod = importlib.import_module(modname)
        assert f"## {modname}\n" in text
        for name in gen.public_names(mod):
            assert f"### `{name}`" in text, f"{modname}.{name} is missing from docs/api.md"


def test_signatures_are_rendered_without_addresses():
    text = (ROOT / "docs" / "api.md").read_text()
    assert " at 0x" not in text
    from lirpa_deq.training import Trainer

    assert "Trainer(config, device='cpu', train_set=None, log=print, dist=None)" in text
    assert inspect.signature(Trainer).parameters["config"]  # the rendered signature is the real one
