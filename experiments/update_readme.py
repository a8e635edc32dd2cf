"""Put every results/<name>.md into experiments/README.md between its markers (the scripts do this themselves).

    python experiments/update_readme.py [--results DIR] [--readme FILE]
"""

import argparse
from pathlib import Path

import common

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--results", default=str(common.RESULTS), help="folder of the q*.md sections")
parser.add_argument("--readme", default=str(common.README), help="the file with the <!-- begin NAME --> markers")
args = parser.parse_args()
readme = Path(args.readme)

for path in sorted(Path(args.results).glob("q*.md")):
    if common.replace_section(readme, path.stem, path.read_text()):
        print(f"updated the section {path.stem}")
