import json
import logging
import os

from poolfs.datapool import DataPool
from poolfs.runtime import OUTPUT_DIRECTORY_ENV, result_to_json

from .program import InputData, run

logging.basicConfig(level=logging.INFO)

# This file is executed if you run `python -m src` from the project root. Use this file to test
# your program locally. `poolfs run-local .` does the same without this file.

# Redirect the platform's output directory for local testing
directory = "./out"
os.makedirs(directory, exist_ok=True)
os.environ[OUTPUT_DIRECTORY_ENV] = directory

with open("./input/data.json") as file:
    data = InputData.model_validate(json.load(file))

result = run(data, my_dataset=DataPool("./input/my_dataset"))

print(result_to_json(result))
