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
    text = readme.read_text()
    begin, end = f"<!-- begin {path.stem} -->", f"<!-- end {path.stem} -->"
    if begin in text and end in text:
        before, rest = text.split(begin, 1)
        _, after = rest.split(end, 1)
        readme.write_text(f"{before}{begin}\n{path.read_text().strip()}\n{end}{after}")
        print(f"updated the section {path.stem}")
