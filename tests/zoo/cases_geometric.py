from tests.zoo.cases import Case

CASES: list[Case] = []
