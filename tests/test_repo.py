"""The README's commands are the ones CI and users run."""

import os
import re

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bash_blocks(text):
  return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_ci_runs_exactly_the_readme_test_command():
  readme = open(os.path.join(_REPO, "README.md"), encoding="utf-8").read()
  commands = [b.strip() for b in _bash_blocks(readme) if "pytest" in b]
  assert len(commands) == 1, commands
  ci = open(os.path.join(_REPO, ".ci", "run"), encoding="utf-8").read()
  assert commands[0] in ci.splitlines()


def test_readme_main_job_command_uses_the_default_config():
  readme = open(os.path.join(_REPO, "README.md"), encoding="utf-8").read()
  main = [b.strip() for b in _bash_blocks(readme) if "launch/main.py --workdir" in b]
  assert len(main) == 1 and 'pip install -e ".[train]"' in main[0]
