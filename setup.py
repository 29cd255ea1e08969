"""Packages of the top-level folders, found under the one import prefix pyproject.toml maps them to."""

from setuptools import find_packages, setup

TOP = ("planner", "recipes", "templates", "runtime")

setup(packages=["megacpp"] + [f"megacpp.{p}" for p in find_packages(include=[f"{t}*" for t in TOP])])
