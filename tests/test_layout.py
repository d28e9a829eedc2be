"""The README's map is the tree: every file it names exists, and every file at the top level and
every file in support/ and experiments/ is named there (a glob such as *.md counts)."""
import fnmatch
import os

from conftest import REPO


def map_entries():
    """(path or glob, its description) for every line of the README's map."""
    text = open(os.path.join(REPO, "README.md")).read()
    block = text.split("\n## Map\n", 1)[1].split("```", 2)[1]
    entries, folder = [], ""
    for line in block.splitlines():
        if not line.strip():
            continue
        name, _, about = line.strip().partition(" ")
        if line.startswith(" "):      # a file inside the folder above it
            entries.append((folder + name, about.strip()))
        else:
            folder = name if name.endswith("/") else ""
            entries.append((name, about.strip()))
    return entries


def test_every_file_the_map_names_exists():
    for path, about in map_entries():
        if about.startswith("(git-ignored)"):
            continue
        found = [p for p in ([path] if "*" not in path else
                             [os.path.join(os.path.dirname(path), f) for f in os.listdir(os.path.join(REPO, os.path.dirname(path)))
                              if fnmatch.fnmatch(f, os.path.basename(path))])
                 if os.path.exists(os.path.join(REPO, p))]
        assert found, f"the README's map names {path}, which is not in the tree"


def test_every_file_of_the_tree_is_on_the_map():
    named = [path for path, _ in map_entries()]
    on_map = lambda p: any(p == n or fnmatch.fnmatch(p, n) for n in named)
    ignored = {"out", "__pycache__", ".pytest_cache"}
    top = [f + ("/" if os.path.isdir(os.path.join(REPO, f)) else "") for f in os.listdir(REPO)
           if not f.startswith(".") and f not in ignored]
    missing = [f for f in top if not on_map(f)]
    for folder in ("support/", "experiments/"):
        missing += [folder + f for f in os.listdir(os.path.join(REPO, folder))
                    if f.endswith((".py", ".sh", ".txt", ".md")) and f != "__init__.py" and not on_map(folder + f)]
    assert not missing, f"not on the README's map: {missing}"
