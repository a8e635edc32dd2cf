"""Put every results/<name>.md into experiments/README.md between its markers (the scripts do this themselves)."""

import common

for path in sorted(common.RESULTS.glob("q*.md")):
    text = common.README.read_text()
    begin, end = f"<!-- begin {path.stem} -->", f"<!-- end {path.stem} -->"
    if begin in text and end in text:
        before, rest = text.split(begin, 1)
        _, after = rest.split(end, 1)
        common.README.write_text(f"{before}{begin}\n{path.read_text().strip()}\n{end}{after}")
        print(f"updated the section {path.stem}")
