"""A minimal .xlsx writer and reader (one sheet, strings and numbers), so the MMBench upload needs
neither pandas nor openpyxl. The files open in Excel, LibreOffice, pandas and openpyxl."""
from __future__ import annotations

import re
import zipfile
from xml.sax.saxutils import escape

from ..io import atomic_open

NS = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
REL = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
PKG_REL = "http://schemas.openxmlformats.org/package/2006/relationships"
CONTENT_TYPES = """<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">
<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>
<Default Extension="xml" ContentType="application/xml"/>
<Override PartName="/xl/workbook.xml" ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml"/>
<Override PartName="/xl/worksheets/sheet1.xml" ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.worksheet+xml"/>
</Types>"""
ROOT_RELS = f"""<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
<Relationships xmlns="{PKG_REL}"><Relationship Id="rId1" Type="{REL}/officeDocument" Target="xl/workbook.xml"/></Relationships>"""
WORKBOOK = f"""<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
<workbook xmlns="{NS}" xmlns:r="{REL}"><sheets><sheet name="Sheet1" sheetId="1" r:id="rId1"/></sheets></workbook>"""
WORKBOOK_RELS = f"""<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
<Relationships xmlns="{PKG_REL}"><Relationship Id="rId1" Type="{REL}/worksheet" Target="worksheets/sheet1.xml"/></Relationships>"""
ILLEGAL_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f]")
ALPHABET = 26


def column_name(index: int) -> str:
    """0 -> A, 25 -> Z, 26 -> AA."""
    name = ""
    index += 1
    while index:
        index, rem = divmod(index - 1, ALPHABET)
        name = chr(ord("A") + rem) + name
    return name


def _cell(ref: str, value) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f'<c r="{ref}"><v>{value}</v></c>'
    text = escape(ILLEGAL_XML.sub("", str(value)))
    return f'<c r="{ref}" t="inlineStr"><is><t xml:space="preserve">{text}</t></is></c>'


def write_xlsx(path: str, header: list[str], rows: list[list]) -> None:
    lines = []
    for r, values in enumerate([header] + rows, 1):
        cells = "".join(_cell(f"{column_name(c)}{r}", v) for c, v in enumerate(values))
        lines.append(f'<row r="{r}">{cells}</row>')
    sheet = (f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n<worksheet xmlns="{NS}"><sheetData>'
             + "".join(lines) + "</sheetData></worksheet>")
    with atomic_open(path, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("[Content_Types].xml", CONTENT_TYPES)
        z.writestr("_rels/.rels", ROOT_RELS)
        z.writestr("xl/workbook.xml", WORKBOOK)
        z.writestr("xl/_rels/workbook.xml.rels", WORKBOOK_RELS)
        z.writestr("xl/worksheets/sheet1.xml", sheet)


def read_xlsx(path: str) -> list[dict]:
    """Rows of the first sheet, as dicts keyed by the header: sheets written by `write_xlsx`, and by Excel,
    LibreOffice or pandas (shared strings, formula strings)."""
    import xml.etree.ElementTree as ET

    with zipfile.ZipFile(path) as z:
        root = ET.fromstring(z.read(_first_sheet(z)))
        shared = []
        if "xl/sharedStrings.xml" in z.namelist():
            for si in ET.fromstring(z.read("xl/sharedStrings.xml")).iter(f"{{{NS}}}si"):
                shared.append("".join(t.text or "" for t in si.iter(f"{{{NS}}}t")))
    table = []
    for row in root.iter(f"{{{NS}}}row"):
        cells = {}
        for c in row.iter(f"{{{NS}}}c"):
            col = re.match(r"[A-Z]+", c.get("r")).group(0)
            v = c.find(f"{{{NS}}}v")
            if c.get("t") == "inlineStr":
                cells[col] = "".join(t.text or "" for t in c.iter(f"{{{NS}}}t"))
            elif v is None or v.text is None:
                cells[col] = None
            elif c.get("t") == "s":
                cells[col] = shared[int(v.text)]
            elif c.get("t") in ("str", "e", "b"):
                cells[col] = v.text
            else:
                cells[col] = float(v.text) if any(ch in v.text for ch in ".eE") else int(v.text)
        table.append(cells)
    header = table[0]
    return [{header[col]: row.get(col) for col in header} for row in table[1:]]


def _first_sheet(z: zipfile.ZipFile) -> str:
    """The first sheet's part: the workbook's first <sheet>, through the workbook's relationships."""
    import xml.etree.ElementTree as ET

    names = z.namelist()
    if "xl/workbook.xml" in names and "xl/_rels/workbook.xml.rels" in names:
        sheet = next(ET.fromstring(z.read("xl/workbook.xml")).iter(f"{{{NS}}}sheet"), None)
        rid = sheet.get(f"{{{REL}}}id") if sheet is not None else None
        for rel in ET.fromstring(z.read("xl/_rels/workbook.xml.rels")):
            if rel.get("Id") == rid:
                target = rel.get("Target").lstrip("/")
                return target if target.startswith("xl/") else f"xl/{target}"
    return "xl/worksheets/sheet1.xml"
