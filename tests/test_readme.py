"""The README opens with the two commands a new user types; CI runs the second one verbatim."""

import re

from tests.conftest import ROOT


def test_readme_starts_with_the_two_commands_and_ci_runs_the_second():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", text, flags=re.S)
    main_cmd, test_cmd = blocks[0].strip(), blocks[1].strip()
    assert text.index(blocks[0]) < 200  # nothing but the title before them
    assert main_cmd.endswith("mlflow run . --env-manager local --experiment-name em-unet")
    assert test_cmd.endswith("python -m pytest -n 2")  # two worker processes (pytest-xdist): the 2-core CI machine
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci == test_cmd
    # The system packages the suite drives (Java, Chromium, PostgreSQL) come with the README's command too,
    # so a newcomer's run skips nothing that CI runs.
    assert test_cmd.startswith("bash .ci/setup-system && ")
    setup = (ROOT / ".ci" / "setup-system").read_text()
    assert all(package in setup for package in ("openjdk-17-jre-headless", "chromium", "postgresql"))
