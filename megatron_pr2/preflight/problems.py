"""The error a validation raises: one entry per problem, so a dry run reports them all at once."""

from __future__ import annotations

from collections.abc import Sequence


class ValidationError(ValueError):
    """The configuration cannot run; ``problems`` names each reason."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


def collect(problems: list[str], check, *args):
    """``check(*args)``, adding its problems to ``problems`` instead of raising.

    A :class:`ValidationError` adds each of its problems; another ``ValueError`` (the trainer's
    own checks raise those) adds its message.
    """
    try:
        return check(*args)
    except ValidationError as err:
        problems.extend(err.problems)
    except ValueError as err:
        problems.append(str(err))
    return None
