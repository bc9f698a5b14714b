"""Every file the packages need that is not Python (the console's templates and static files,
the CAP schema) is named in setup.py's package_data, so an installed ttcs-ctl has them: a
wheel carries only .py files and what package_data names."""

import ast
import fnmatch
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def package_data() -> dict[str, list[str]]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "package_data":
            return ast.literal_eval(node.value)
    return {}


def test_every_data_file_of_the_packages_is_in_package_data():
    data = package_data()
    files = subprocess.run(["git", "ls-files", "agent", "ctl", "drivers"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    assert files, "git ls-files found nothing"
    missing = []
    for name in files:
        if name.endswith(".py"):
            continue
        package, rest = name.split("/", 1)
        if not any(fnmatch.fnmatch(rest, g) for g in data.get(package, [])):
            missing.append(name)
    assert not missing, f"not in setup.py package_data (a wheel would lack them): {missing}"
    assert "console/templates/*.html" in data["ctl"]
