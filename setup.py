"""The wheel's layout. It carries the top-level ``studies/`` (the folder people edit) as ``mlgate/studies``,
so an installed mlgate lists and runs every shipped study."""

from setuptools import find_namespace_packages, setup

STUDIES = ["mlgate.studies"] + [f"mlgate.studies.{name}" for name in find_namespace_packages("studies")]

setup(
    packages=find_namespace_packages(include=["mlgate*"]) + STUDIES,
    package_dir={"mlgate.studies": "studies"},
    package_data={"mlgate": ["model/configs/*.json", "model/weights/*.pt", "model/weights/*.json"],
                  **{name: ["*.yaml"] for name in STUDIES}},
)
