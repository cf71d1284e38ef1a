"""errors.one_line: how an exception is shown inside a one-line error message."""

import optuna
import sqlalchemy.exc

from mnist_sweep.errors import MAX_LINE, UserError, one_line


def test_a_multi_line_message_keeps_its_first_line_and_the_type():
    e = RuntimeError("\n  connection refused  \n\tIs the server running on that host?\n")
    assert one_line(e) == "RuntimeError: connection refused"


def test_a_line_ending_in_a_colon_keeps_the_line_it_introduces():
    # torchvision's failed download: the reason is on the third line
    e = RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://mirror/, got:\n"
                     "<urlopen error [Errno -2] Name or service not known>\nTried https://other/, got:\n...")
    assert one_line(e, typed=False) == ("Error downloading train-images-idx3-ubyte.gz: Tried https://mirror/, got: "
                                        "<urlopen error [Errno -2] Name or service not known>")


def test_an_empty_message_gives_the_type_name():
    assert one_line(AssertionError()) == "AssertionError"
    assert one_line(ValueError("  \n "), typed=False) == "ValueError"


def test_a_long_message_is_shortened():
    text = one_line(ValueError("x" * 1000))
    assert len(text) == MAX_LINE and text.startswith("ValueError: xxx") and text.endswith("...")


def test_a_database_error_shows_the_drivers_error_without_sqlalchemys_context():
    e = sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("database is locked"))
    assert "[SQL: SELECT 1]" in str(e)
    assert one_line(e) == "OperationalError: database is locked"


def test_optunas_storage_wrapper_shows_its_cause():
    cause = sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("unable to open database file"))
    try:
        try:
            raise cause
        except sqlalchemy.exc.OperationalError as e:
            raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.") from e
    except optuna.exceptions.StorageInternalError as wrapper:
        assert one_line(wrapper) == "OperationalError: unable to open database file"


def test_another_exceptions_cause_is_not_shown_instead_of_it():
    try:
        try:
            raise ValueError("inner")
        except ValueError as e:
            raise UserError("outer") from e
    except UserError as e:
        assert one_line(e) == "UserError: outer"
