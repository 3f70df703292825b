"""Print the serving dependencies from pyproject.toml, one per line, for the images' build stage:
installing them before the source is copied keeps that layer cached across code changes.

    python serving_requirements.py [--without faiss-cpu onnxruntime]   (the GPU image swaps those two)
"""

import argparse
import re
import tomllib

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--pyproject", default="pyproject.toml")
parser.add_argument("--without", nargs="*", default=[], help="distributions to leave out")
args = parser.parse_args()
with open(args.pyproject, "rb") as f:
    dependencies = tomllib.load(f)["project"]["dependencies"]
for requirement in dependencies:
    if re.split(r"[<>=!~ \[;]", requirement, maxsplit=1)[0].lower() not in args.without:
        print(requirement)
