"""A citizen app against a quarter node's Open311 endpoint, written with an
independent client library from PyPI: georeport (GeoReport v2 reads, in
JSON and XML). georeport has no call for creating requests, so the post is
made with `requests`, the HTTP library georeport itself uses, exactly as the
spec defines it (a form-encoded POST to requests.json).

Run by tests/tests/open311.rs:
    python open311_app.py BASE_URL report API_KEY   -> prints {"id": ..., ...}
    python open311_app.py BASE_URL status REQUEST_ID -> prints the request as both formats read it
Every answer is printed as one JSON object on stdout; failures raise.
"""

import json
import sys

import requests
from georeport import GeoReport


def clients(base):
    return GeoReport(base, output_format="json"), GeoReport(base, output_format="xml")


def report(base, api_key):
    as_json, as_xml = clients(base)
    services = as_json.get_service_list()
    codes = [s["service_code"] for s in services]
    xml_codes = [s["service_code"] for s in as_xml.get_service_list()]
    assert codes == xml_codes, (codes, xml_codes)
    assert "road-damage" in codes, codes
    definition = as_xml.get_service_definition("road-damage")
    attributes = definition["attributes"]["attribute"]
    required = [a["code"] for a in attributes if a["required"] == "true"]
    answer = requests.post(
        f"{base}/requests.json",
        data={
            "api_key": api_key,
            "service_code": "road-damage",
            "lat": "51.0013",
            "long": "13.7952",
            "description": "Schlagloch vor der Haltestelle Jacob-Winter-Platz",
            "email": "erika@example.org",
            "first_name": "Erika",
            "last_name": "Muster",
            **{f"attribute[{code}]": "yes" for code in required},
        },
        timeout=20,
    )
    answer.raise_for_status()
    created = answer.json()[0]
    request_id = created["service_request_id"]
    read_json = as_json.get_service_request(request_id)
    read_xml = as_xml.get_service_request(request_id)
    listed = [r["service_request_id"] for r in as_json.get_service_requests(status="open")]
    print(
        json.dumps(
            {
                "services": codes,
                "required": required,
                "id": request_id,
                "token": created["token"],
                "json": read_json,
                "xml": read_xml,
                "listed_open": listed,
            }
        )
    )


def status(base, request_id):
    as_json, as_xml = clients(base)
    print(
        json.dumps(
            {
                "json": as_json.get_service_request(request_id),
                "xml": as_xml.get_service_request(request_id),
                "closed": [
                    r["service_request_id"]
                    for r in as_json.get_service_requests(status="closed")
                ],
            }
        )
    )


if __name__ == "__main__":
    base, command, arg = sys.argv[1:4]
    if command == "report":
        report(base, arg)
    elif command == "status":
        status(base, arg)
    else:
        raise SystemExit(f"unknown command {command}")
