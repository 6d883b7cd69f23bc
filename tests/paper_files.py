"""Small files in the published layouts of the paper's data sources (LIMA, Deita-6k, MetaMathQA,
ShareGPT V3, DEITA selections), for the tests of data/paper.py, the DEITA selection and the paper configs."""

import json


def write_lima(path, n=12):
    rows = [{"conversations": [f"Question {i}: how do I sort a list?", f"Use sorted(x), answer {i}."]
             + ([f"And in reverse {i}?", "sorted(x, reverse=True)."] if i % 3 == 0 else []),
             "source": "stackexchange"} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def write_deita(path, n=12):
    rows = [{"id": f"d{i}", "conversations": [{"from": "human", "value": f"Write a short poem about topic {i}."},
                                              {"from": "gpt", "value": f"Roses and topic {i}, " * (1 + i % 3)}]}
            for i in range(n)]
    path.write_text(json.dumps(rows, indent=1))
    return path


def write_metamathqa(path, n=12):
    rows = [{"query": f"What is {i} + {i + 1}?", "response": f"We add: {i} + {i + 1} = {2 * i + 1}.\nThe answer is: {2 * i + 1}",
             "type": "GSM_AnsAug", "original_question": f"What is {i} + {i + 1}?"} for i in range(n)]
    path.write_text(json.dumps(rows))
    return path


def write_sharegpt(path, n=12):
    rows = []
    for i in range(n):
        rows.append({"id": f"s{i}_0", "conversations": [{"from": "human", "value": f"Tell me about place {i}"},
                                                        {"from": "gpt", "value": f"Place {i} is lovely in spring."}]})
        rows.append({"id": f"s{i}_1", "conversations": [{"from": "gpt", "value": "continued part"}]})  # later part: skipped
    rows.append({"id": "bad", "conversations": [{"from": "human", "value": "no reply"}]})  # noisy: skipped, counted
    path.write_text(json.dumps(rows))
    return path


def write_selection(path, rows_from, n=12):
    """What `ual select` writes: JSONL in the messages layout (with id/source/meta beside)."""
    samples, _ = rows_from
    path.write_text("\n".join(json.dumps({"messages": s.messages, "id": s.id, "source": s.source,
                                          "meta": {"deita": {"score": 1.0}}}) for s in samples[:n]) + "\n")
    return path
