"""The generated config-field data (peft_buffers/binding/_config_fields.py) against the installed PEFT (issue 12).

``nox -s compat`` runs this on every line's tested release, ``nox -s crossversion`` checks every line in one go.
"""

from __future__ import annotations

import copy

import peft
from packaging.version import Version

from peft_buffers.binding import registry
from peft_buffers.binding.registry import REGISTRY, entry_for
from peft_buffers.cli._fieldscan import ABSENT, MODULE, data_mismatches, default_on, live_config_fields, merge, render

data = registry.config_fields_data()


def installed_line() -> str:
    return entry_for(Version(peft.__version__)).line


# issue 12: which fields each release knows is data, generated from the matrix venvs and checked
def test_the_data_matches_the_installed_peft():
    assert data_mismatches(installed_line()) == []


def test_a_difference_is_reported_by_field():
    live = copy.deepcopy(live_config_fields())
    del live["LORA"]["fields"]["r"]
    live["LORA"]["fields"]["lora_alpha"] = 16
    live["LORA"]["fields"]["made_up"] = None
    line = installed_line()
    assert data_mismatches(line, live) == [
        "LoraConfig.lora_alpha: default 16, the data says 8",
        "LoraConfig: the installed PEFT has field made_up, the data has not on " + line,
        "LoraConfig: the data has field r on " + line + ", the installed PEFT has not",
    ]


def test_every_registry_line_is_in_the_data():
    assert data.LINES == tuple(entry.line for entry in REGISTRY)


def test_the_module_is_exactly_what_the_generator_writes():
    # Rebuild each line's scan from the data, merge and render again: a hand edit or a generator change
    # without regenerating shows up here.
    scans = {}
    for line in data.LINES:
        scans[line] = {}
        for peft_type, history in data.PEFT_TYPES.items():
            class_name = default_on(history, line)
            if class_name == ABSENT:
                continue
            fields = {name: default_on(h, line) for name, h in data.FIELDS[class_name].items()}
            scans[line][peft_type] = {"class": class_name,
                                      "fields": {n: d for n, d in fields.items() if d != ABSENT}}
    assert render(merge(scans)) == MODULE.read_text()
