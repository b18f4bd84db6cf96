"""The subcommand registry: the one place that lists what `mpitrain` can do.

Each entry names a module in this package that defines
  NAME: str            the subcommand
  HELP: str            one line for `mpitrain --help`
  add_arguments(p)     fills its argparse parser (every option with help text and default)
  run(args) -> int     does the work; raises mpitrain.errors.UserError for user mistakes
Only commands that work are listed.
"""

COMMANDS = (
    "prepare",
    "inspect",
    "train",
    "export",
    "infer",
    "serve",
    "monitor",
    "plot",
)

# The subcommand used when the first argument is not a command name (train, as README's main job).
DEFAULT_COMMAND = "train"
