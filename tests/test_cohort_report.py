"""The cohort page: rows ordered by involvement, scans without a figure last, failures listed."""
from utils.cohort_report import write_cohort_page


def _row(scan_id: str, involvement, status: str = "ok") -> dict:
    return {"input": f"scans/{scan_id}.nii.gz", "scan_id": scan_id, "status": status,
            "total.involvement_percent": involvement, "covid_cls.probability": "0.5",
            "warnings": "", "error": "" if status == "ok" else "bad header"}


def test_most_involved_first_and_scans_without_a_figure_last(tmp_path):
    rows = [_row("none", ""), _row("low", "2.5"), _row("nan", "nan"), _row("high", "30"),
            _row("zero", 0.0), _row("broken", "", status="error")]
    page = write_cohort_page(rows, tmp_path).read_text()
    table = page[page.index("<table>"):]
    order = sorted(["high", "low", "zero", "none", "nan"], key=lambda sid: table.index(f"alt='{sid}'"))
    assert order[:3] == ["high", "low", "zero"]
    assert set(order[3:]) == {"none", "nan"}
    assert "5 analysed, 1 failed" in page and "bad header" in page
    assert (tmp_path / "cohort_involvement.png").stat().st_size > 0
