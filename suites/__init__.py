"""The built-in suites, shipped in the wheel as package data of `moebench.suites`.

`moebench suites` lists them; `moebench run NAME` runs one by name (`moebench.catalog`).
"""
