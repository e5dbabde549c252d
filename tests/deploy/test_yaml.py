"""yamllint on every YAML file under deploy/, with deploy/.yamllint.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest
from yamllint import linter
from yamllint.config import YamlLintConfig

from .conftest import DEPLOY, ROOT, yaml_files

CONFIG = YamlLintConfig(file=str(DEPLOY / ".yamllint.yaml"))


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_yamllint(path: Path) -> None:
    problems = [
        f"{path.relative_to(ROOT)}:{p.line}:{p.column}: {p.level}: {p.desc} ({p.rule})"
        for p in linter.run(path.read_text(), CONFIG, str(path))
    ]
    assert not problems, "\n".join(problems)


def test_every_yaml_file_is_linted() -> None:
    assert len(yaml_files()) >= 15
