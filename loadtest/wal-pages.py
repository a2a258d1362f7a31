#!/usr/bin/env python3
"""Which b-trees the embedded store's commits write: reads the WAL's frame headers (each frame is
one page a commit wrote) and names each page's table or index with SQLite's `dbstat`.

Usage: python3 loadtest/wal-pages.py DATA_DIR
Run it on the data directory of a `parley serve` that was killed with `kill -9` under load (a
clean stop checkpoints the WAL away). The WAL holds the commits since SQLite last restarted it,
about 1,000 pages' worth; BENCHMARKS says how many the figures there came from.
"""
import collections
import os
import shutil
import sqlite3
import struct
import sys
import tempfile


def frames(wal):
    """(page number, is a commit's last frame) of every frame written since the WAL's restart."""
    with open(wal, "rb") as f:
        data = f.read()
    if len(data) < 32:
        return [], 0
    _, _, page_size, _, salt1, salt2, _, _ = struct.unpack(">IIIIIIII", data[:32])
    out, offset = [], 32
    while offset + 24 + page_size <= len(data):
        page, commit_size, s1, s2 = struct.unpack(">IIII", data[offset:offset + 16])
        if (s1, s2) != (salt1, salt2):
            break  # frames of before the restart
        out.append((page, commit_size != 0))
        offset += 24 + page_size
    return out, page_size


def owners(db, wal):
    """Page number to table or index name, from a copy (opening the database replays the WAL)."""
    with tempfile.TemporaryDirectory() as scratch:
        shutil.copy(db, os.path.join(scratch, "copy.sqlite"))
        shutil.copy(wal, os.path.join(scratch, "copy.sqlite-wal"))
        connection = sqlite3.connect(os.path.join(scratch, "copy.sqlite"))
        try:
            return dict((page, name) for name, page in connection.execute("SELECT name, pageno FROM dbstat"))
        finally:
            connection.close()


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    db = os.path.join(sys.argv[1], "parley.sqlite")
    wal = db + "-wal"
    written, page_size = frames(wal)
    commits = sum(1 for _, last in written if last)
    if not commits:
        sys.exit("no commit in the WAL: was the server stopped cleanly?")
    names = owners(db, wal)
    print(f"{len(written)} pages of {page_size} bytes in {commits} commits: {len(written) / commits:.1f} a commit")
    counts = collections.Counter(names.get(page, "(freed since)") for page, _ in written)
    for name, count in counts.most_common():
        print(f"{count / commits:6.2f} a commit  {100 * count / len(written):5.1f}%  {name}")


if __name__ == "__main__":
    main()
