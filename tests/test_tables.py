"""adv.evaluate.tables.markdown_table: the one markdown-table formatter, in the shape the hand-written tables had."""

import pytest

from adv.evaluate.tables import markdown_table


def test_header_rule_and_rows_as_the_hand_written_tables_had_them():
    assert markdown_table(["a", "b"], [[1, 0.5], ["x", None]]) == [
        "| a | b |", "|---|---|", "| 1 | 0.5 |", "| x | None |"]


def test_alignment_per_column_and_empty_cells_one_space_wide():
    assert markdown_table(["", "seconds", "n"], [["total", "**1.0**", ""]], "lrr") == [
        "| | seconds | n |", "|---|---:|---:|", "| total | **1.0** | |"]
    assert markdown_table(["#cell", "eps"], [], ["r", "r"]) == ["| #cell | eps |", "|---:|---:|"]


def test_a_pipe_in_a_cell_is_escaped_so_the_row_keeps_its_columns():
    lines = markdown_table(["spec", "acc"], [["`jpeg|dwt`", "50%"]])
    assert lines[2] == "| `jpeg\\|dwt` | 50% |"
    assert lines[2].replace("\\|", "").count("|") == 3  # three column borders, as the header has


@pytest.mark.parametrize("align", ["l", "lc", ["l", "x"]])
def test_bad_alignment_is_one_clear_error(align):
    with pytest.raises(ValueError, match="'l' or 'r' for each of the 2 columns"):
        markdown_table(["a", "b"], [], align)


def test_a_row_of_the_wrong_width_is_refused():
    with pytest.raises(ValueError, match="2 cells for 3 columns"):
        markdown_table(["a", "b", "c"], [["1", "2"]])
