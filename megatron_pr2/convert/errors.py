"""The one error type every conversion refusal raises."""


class ConversionError(ValueError):
    """A checkpoint cannot be converted or loaded as asked; the message names the problem."""
