"""lm-eval hooks for the quickstart tasks: the data comes from the package's seeded generators."""

from pefteval_harness.tasks import quickstart


# lm-eval passes the task metadata and all model_args as keyword arguments: accept and ignore them.
def sentiment(**kwargs):
    return quickstart.dataset("sentiment")


def sentiment_adversarial(**kwargs):
    return quickstart.adversarial_dataset("sentiment")


def topic(**kwargs):
    return quickstart.dataset("topic")


def arithmetic(**kwargs):
    return quickstart.dataset("arithmetic")


def echo(**kwargs):
    return quickstart.dataset("echo")
