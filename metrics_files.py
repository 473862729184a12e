"""Every gunicorn worker's figures, read from the files prometheus_client keeps them in and
added up into Prometheus text, fast enough for every scrape (docs/observability.md).

prometheus_client's own reader (MultiProcessCollector, then generate_latest) parses every
entry's key (JSON) and makes objects for every value at every scrape: 14 ms for 266 values
of two workers on the machine measured, more with every value and every worker. Yet a
worker's file only grows at its end: prometheus_client's MmapedDict appends an entry (its
key, then its value and a timestamp) once, then changes the value in place, and only then
counts the entry in the size at the file's start. So here each entry is parsed once per
process, where its value lies is kept, and a scrape reads the values and any entries added
since. Only counters and histograms are read so (all the service keeps); a folder with
another kind of file is left to prometheus_client (read_folder answers None).
"""

import glob
import json
import os
import struct
import threading
from collections import defaultdict

from prometheus_client.utils import floatToGoString

KINDS = ("counter", "histogram")
FIRST_ENTRY = 8  # after the size in use (4 bytes) and 4 bytes of padding
_INT = struct.Struct("i")
_ENTRIES = {}  # a file's path: (parsed up to, [(key, where its value is)])
# One scrape at a time reads the files: two threads parsing a file's new entries at once
# would each add them to its list of entries.
_READING = threading.Lock()
_KEYS = {}  # an entry's key: what its line needs (_parsed_key)


def read_folder(folder):
    """{kind: {key: value summed over all the files}} of the files in folder; None when it
    holds a kind of file other than KINDS."""
    totals = {kind: defaultdict(float) for kind in KINDS}
    with _READING:
        for path in glob.glob(os.path.join(folder, "*.db")):
            sums = totals.get(os.path.basename(path).partition("_")[0])
            if sums is None:
                return None
            add_file(path, sums)
    return totals


def add_file(path, sums):
    """Add the value of every entry of one worker's file to sums, by key."""
    with open(path, "rb") as file:
        data = file.read()
    used = _INT.unpack_from(data, 0)[0]
    parsed_to, entries = _ENTRIES.get(path, (FIRST_ENTRY, []))
    if used < parsed_to:  # not the file that was parsed (a new one under its name)
        parsed_to, entries = FIRST_ENTRY, []
    while parsed_to < used:
        length = _INT.unpack_from(data, parsed_to)[0]
        key = data[parsed_to + 4:parsed_to + 4 + length].decode()
        parsed_to += 4 + length + 8 - (length + 4) % 8  # the key is padded to 8 bytes
        entries.append((key, parsed_to // 8))
        parsed_to += 16  # the value and its timestamp
    _ENTRIES[path] = (parsed_to, entries)
    doubles = memoryview(data)[:len(data) // 8 * 8].cast("d")  # every value is 8-aligned
    for key, index in entries:
        sums[key] += doubles[index]


def _parsed_key(key):
    """(metric, help, the start of the sample's line, and for a histogram's bucket the
    labels of its series and its bound, else None) of an entry's key."""
    found = _KEYS.get(key)
    if found is None:
        metric, name, labels, help_text = json.loads(key)
        bound = labels.pop("le", None)  # as prometheus_client wrote it: floatToGoString
        text = ",".join(f'{label}="{escaped(value)}"' for label, value in sorted(labels.items()))
        if bound is None:
            found = (metric, help_text, head(name, text), None)
        else:
            bucket = head(f"{metric}_bucket", f'{text}{"," if text else ""}le="{bound}"')
            found = (metric, help_text, bucket, (text, float(bound)))
        _KEYS[key] = found
    return found


def text(totals):
    """The Prometheus text of read_folder's totals, a metric at a time."""
    families = {}
    for kind, sums in totals.items():
        for key, value in sums.items():
            metric, help_text, start, bucket = _parsed_key(key)
            family = families.get(metric) or families.setdefault(
                metric, (kind, help_text, [], defaultdict(list)))
            if bucket is None:
                family[2].append(start + floatToGoString(value) + "\n")
            else:  # a bucket counts only its own values in the files; summed up in _lines
                family[3][bucket[0]].append((bucket[1], start, value))
    return "".join(line for metric, family in families.items()
                   for line in _lines(metric, *family))


def _lines(metric, kind, help_text, samples, buckets):
    """The lines of one metric, as prometheus_client's generate_latest writes them."""
    title = f"{metric}_total" if kind == "counter" else metric
    yield f"# HELP {title} {escaped_help(help_text)}\n# TYPE {title} {kind}\n"
    yield from samples
    for labels, counts in buckets.items():
        total = 0.0
        for _, start, value in sorted(counts):
            total += value
            yield start + floatToGoString(total) + "\n"
        yield line(f"{metric}_count", labels, total)


def head(name, labels):
    """The start of a sample's line, up to its value; labels as text, `a="1",b="2"`."""
    return f"{name}{{{labels}}} " if labels else f"{name} "


def line(name, labels, value):
    """One sample's line."""
    return head(name, labels) + floatToGoString(value) + "\n"


def escaped(value):
    """A label value as the text format quotes it."""
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def escaped_help(help_text):
    """A HELP text as the text format writes it."""
    return help_text.replace("\\", r"\\").replace("\n", r"\n")
