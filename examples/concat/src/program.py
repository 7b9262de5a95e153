import os

from pydantic import BaseModel

from poolfs.datapool import DataPool


class InputData(BaseModel):
    file_to_read_from_my_dataset: str
    file_to_read_from_another_dataset: str


def run(
    data: InputData, my_dataset: DataPool, another_dataset: DataPool, output_datapool: DataPool
) -> str:
    """
    Combines the content of the specified files from two different Data Pools in a third Data Pool.
    """
    try:
        with my_dataset.open(data.file_to_read_from_my_dataset) as f1:
            content1 = f1.read()

        with another_dataset.open(data.file_to_read_from_another_dataset) as f2:
            content2 = f2.read()

        # You can also write to the output Data Pool if needed
        concatenated_file = os.path.join(output_datapool.path, "concatenated_output.txt")
        with open(concatenated_file, "w") as out_file:
            out_file.write(content1)
            out_file.write(content2)

        return f"Content from my_dataset: {content1}\nContent from another_dataset: {content2}"
    except FileNotFoundError as e:
        return str(e)
