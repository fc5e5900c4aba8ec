"""README.md's Python snippets run, and its two commands are the ones CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_python_snippets_run_in_order():
    snippets = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert len(snippets) >= 3
    namespace: dict = {}
    for snippet in snippets:
        exec(compile(snippet, "README.md", "exec"), namespace)


def test_readme_opens_with_the_setup_and_test_commands_ci_runs():
    first_block = re.search(r"```bash\n(.*?)```", README, flags=re.S).group(1).strip().splitlines()
    assert len(first_block) == 2 and "examples/" in first_block[0]
    ci_script = (ROOT / ".ci" / "run").read_text()
    assert first_block[1] in ci_script.splitlines()
