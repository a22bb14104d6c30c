"""Every script's --help explains every flag: each option carries a help text of its own."""

import argparse
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(
    str(p.relative_to(ROOT))
    for pattern in ("*.py", "experiments/*.py", "bench/*.py")
    for p in ROOT.glob(pattern)
    if "def parse_args" in p.read_text()
)


class Captured(Exception):
    pass


def parser_of(script, monkeypatch):
    """The script's ArgumentParser, caught as parse_args is about to parse. The script's folder
    goes first on sys.path, as `python folder/script.py` puts it (experiments/ import each other)."""
    monkeypatch.syspath_prepend(str((ROOT / script).parent))
    spec = importlib.util.spec_from_file_location(Path(script).stem + "_cli", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def capture(self, *args, **kwargs):
        raise Captured(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(Captured) as caught:
        module.parse_args([])
    return caught.value.args[0]


def test_the_main_scripts_are_all_checked():
    main = {"prepare_data.py", "train.py", "evaluate.py", "export.py", "infer.py"}
    assert main <= set(SCRIPTS) and len(SCRIPTS) > len(main)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_has_help(script, monkeypatch):
    parser = parser_of(script, monkeypatch)
    assert parser.description, f"{script}: no description"
    bare = [
        "/".join(a.option_strings) or a.dest
        for a in parser._actions
        if not isinstance(a, argparse._HelpAction)
        and a.help is not argparse.SUPPRESS
        and len((a.help or "").split()) < 2
    ]
    assert not bare, f"{script}: flags without a help text: {bare}"
