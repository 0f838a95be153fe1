"""The layout's promises: cxr/ modules import only those above them in cxr/__init__.py's
list, nothing imports a script, and the scripts and modules stay within their sizes."""

import ast
import re

import pytest
from conftest import ROOT

SCRIPTS = {"download_dataset", "train_cxray", "predict", "visualize_results"}
LINES = {"train_cxray.py": 400, "predict.py": 300, "visualize_results.py": 500}


def module_order():
    doc = ast.get_docstring(ast.parse((ROOT / "cxr" / "__init__.py").read_text()))
    return re.findall(r"^    (\w+) ", doc, re.M)


def imported(path):
    """Top-level names of the modules a file imports, and the cxr modules it uses."""
    names, cxr = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
            cxr |= {a.name.split(".")[1] for a in node.names if a.name.startswith("cxr.")}
        elif isinstance(node, ast.ImportFrom):
            # a relative import inside cxr/ ("from . import x", "from .x import y") is cxr's
            module = ("cxr" + (f".{node.module}" if node.module else "") if node.level
                      else node.module)
            names.add(module.split(".")[0])
            if module == "cxr":
                cxr |= {a.name for a in node.names}
            elif module.startswith("cxr."):
                cxr.add(module.split(".")[1])
    return names, cxr


def test_every_module_is_listed_in_the_order():
    order = module_order()
    files = sorted(p.stem for p in (ROOT / "cxr").glob("*.py") if p.stem != "__init__")
    assert sorted(order) == files


@pytest.mark.parametrize("module", module_order())
def test_a_module_imports_only_modules_above_it(module):
    order = module_order()
    names, cxr = imported(ROOT / "cxr" / f"{module}.py")
    above = set(order[:order.index(module)])
    assert cxr <= above, f"cxr.{module} imports {sorted(cxr - above)}, listed below it"
    assert not names & (SCRIPTS | {"gradcam", "experiments"})


def test_nothing_imports_a_script():
    files = [*ROOT.glob("*.py"), *(ROOT / "cxr").glob("*.py"), *(ROOT / "experiments").glob("*.py"),
             *(ROOT / "docs").glob("*.py")]
    for path in files:
        names, _ = imported(path)
        assert not names & SCRIPTS, f"{path.relative_to(ROOT)} imports {sorted(names & SCRIPTS)}"


def test_scripts_and_modules_keep_their_size():
    for name, limit in LINES.items():
        n = len((ROOT / name).read_text().splitlines())
        assert n <= limit, f"{name}: {n} lines, at most {limit}"
    for path in (ROOT / "cxr").glob("*.py"):
        n = len(path.read_text().splitlines())
        assert n <= 450, f"{path.relative_to(ROOT)}: {n} lines, at most 450"


def test_the_reading_fits_the_lab():
    """The README is read in about 10 minutes and all teaching pages stay one sitting."""
    words = lambda path: len(path.read_text(encoding="utf-8").split())  # noqa: E731
    readme = words(ROOT / "README.md")
    assert readme <= 1500, f"README.md: {readme} words, at most 1,500"
    total = readme + sum(words(p) for p in (ROOT / "docs").glob("*.md"))
    assert total <= 12000, f"README.md and docs/*.md: {total} words, at most 12,000"


CALIBRATION_FIELDS = {"temperature", "temperatures", "threshold", "referral", "ensemble_temperature"}
ONLY_CALIBRATION = {"temperatures", "ensemble_temperature", "min_confidence"}  # no other key's name
CALIBRATION_ATTRIBUTES = {"referral", "temperatures", "ensemble_temperature"}  # Calibration's own


def calibration_reads(source: str) -> list[str]:
    """Where code reads a calibration's fields itself, not through calib.Calibration's
    methods: a string naming a field only a calibration has, a subscript or .get() of a
    field on something named like a calibration (cal, calibration, cal_in, ...), or one
    of the Calibration attributes that the referral rule keeps to itself."""
    def cal_like(node):
        return "cal" in ast.unparse(node).lower()

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and node.value in ONLY_CALIBRATION:
            found.append(f"line {node.lineno}: {node.value!r}")
        elif (isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant)
              and node.slice.value in CALIBRATION_FIELDS and cal_like(node.value)):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "get" and node.args and isinstance(node.args[0], ast.Constant)
              and node.args[0].value in CALIBRATION_FIELDS and cal_like(node.func.value)):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Attribute) and node.attr in CALIBRATION_ATTRIBUTES:
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_only_calib_reads_calibration_fields():
    """One Calibration object (cxr/calib.py) fits, applies, decides and serialises: no
    other module, script, experiment or docs builder reads the fields of a calibration,
    so that a new referral rule changes cxr/calib.py alone (and cxr/selective.py, which
    fits the rule's record and says whether a measurement keeps its promise)."""
    for planted in ('c = cal["referral"]["min_confidence"]', "t = cal.temperatures[0]",
                    'thr = calibration.get("threshold", 0.5)', 'meta["calibration"]["temperature"]',
                    "rule = cal_in.referral", 'conf >= rule["min_confidence"]'):
        assert calibration_reads(planted), planted  # the check sees each kind of read
    assert not calibration_reads('cal.decide(p); cal.threshold; row["threshold"]')
    files = [*ROOT.glob("*.py"), *(ROOT / "cxr").glob("*.py"), *(ROOT / "experiments").glob("*.py"),
             *(ROOT / "docs").glob("*.py")]
    for path in files:
        if path not in (ROOT / "cxr" / "calib.py", ROOT / "cxr" / "selective.py"):
            reads = calibration_reads(path.read_text())
            assert not reads, f"{path.relative_to(ROOT)} reads calibration fields: {reads}"
