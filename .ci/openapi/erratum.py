"""Writes the copies of Pleo's OpenAPI files that the OpenAPI check runs against.

Usage: erratum.py SOURCE_DIR OUT_DIR

Each change to Pleo's text is listed here and printed, and docs/contract.md ("Contract decisions")
says why. The files in ../shared are never modified.

Erratum (a fault in the files):
  E1  date-time fields carry `pattern: YYYY-MM-DDTHH:mi:ssZ`, a date-format string no
      timestamp matches; the pattern is dropped and `format: date-time` kept.

Decisions (where the files are silent, what the fake does, written into the copy so the
check holds it to them):
  D1  every served operation may answer 400 with Pleo's ExceptionInfo for a request its
      schema refuses;
  D2  every served operation may answer 401 (no or bad credentials) and 403 (a company's
      key used on another company), with ExceptionInfo;
  D3  an unknown job is 404 EXPORT_NOT_FOUND on GET /v3/export-items and
      POST /v3/export-job-events, as on the job's other operations;
  D4  a request body is required where its schema has required properties (the files do
      not mark these bodies required).

Test wiring (no change to what any request or answer may be):
  T1  OpenAPI links from a created export job (POST /v3/export-jobs, 201) to the operations
      that take its id, so the stateful phase works on jobs that exist.
"""

import copy
import pathlib
import sys

import yaml

SERVED = {
    "pleo-export-openapi.yml": ("/v3/export-jobs", "/v3/export-items", "/v3/export-job-events"),
    "pleo-webhook-subscriptions-openapi.yml": ("/v1/subscriptions",),
}
METHODS = ("get", "put", "post", "delete", "patch")


def exception_info(spec, description):
    if "ExceptionInfo" in spec.get("components", {}).get("schemas", {}):
        schema = {"$ref": "#/components/schemas/ExceptionInfo"}
    else:
        schema = {
            "type": "object",
            "required": ["type"],
            "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
        }
    return {
        "description": description,
        "content": {"application/json;charset=UTF-8": {"schema": schema}},
    }


def drop_date_time_patterns(node, count):
    if isinstance(node, dict):
        if node.get("format") == "date-time" and "pattern" in node:
            del node["pattern"]
            count[0] += 1
        for v in node.values():
            drop_date_time_patterns(v, count)
    elif isinstance(node, list):
        for v in node:
            drop_date_time_patterns(v, count)


def resolve(spec, schema):
    while isinstance(schema, dict) and "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        schema = spec["components"]["schemas"][name]
    return schema


def main(src_dir, out_dir):
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, prefixes in SERVED.items():
        spec = yaml.safe_load((pathlib.Path(src_dir) / name).read_text())
        original = copy.deepcopy(spec)
        count = [0]
        drop_date_time_patterns(spec, count)
        print(f"{name}: E1 dropped {count[0]} date-time patterns")
        added = []
        for path, item in spec["paths"].items():
            if not path.startswith(prefixes):
                continue
            for method in METHODS:
                op = item.get(method)
                if op is None:
                    continue
                responses = op.setdefault("responses", {})
                where = f"{method.upper()} {path}"
                for code, why, tag in (
                    ("400", "The request does not match the schema.", "D1"),
                    ("401", "No or invalid credentials.", "D2"),
                    ("403", "The credential does not reach this company.", "D2"),
                ):
                    if code not in responses:
                        responses[code] = exception_info(spec, why)
                        added.append(f"{tag} {where}: {code}")
                if where in ("GET /v3/export-items", "POST /v3/export-job-events") and "404" not in responses:
                    responses["404"] = exception_info(spec, "Export job not found.")
                    added.append(f"D3 {where}: 404")
                body = op.get("requestBody")
                if body and not body.get("required"):
                    schemas = [resolve(spec, c.get("schema", {})) for c in body.get("content", {}).values()]
                    if any(s.get("required") or (s.get("type") == "array") for s in schemas):
                        body["required"] = True
                        added.append(f"D4 {where}: body required")
        create = spec["paths"].get("/v3/export-jobs", {}).get("post")
        if create is not None:
            job_id = "$response.body#/data/id"
            create["responses"]["201"]["links"] = {
                "GetJob": {"operationId": "getExportJobByIdV3", "parameters": {"jobId": job_id}},
                "GetJobItems": {"operationId": "getExportJobItemsV3", "parameters": {"jobId": job_id}},
                "PutJobItems": {"operationId": "updateExportJobItemsV3", "parameters": {"jobId": job_id}},
                "GetExportItems": {"operationId": "getExportItemsV3", "parameters": {"job_id": job_id}},
                "PostEvent": {
                    "operationId": "createExportJobEventV3",
                    "requestBody": {"event": "started", "jobId": job_id},
                },
            }
            added.append("T1 POST /v3/export-jobs: links to the job's operations")
        for line in added:
            print(f"{name}: {line}")
        assert original["paths"].keys() == spec["paths"].keys()
        (out / name).write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
