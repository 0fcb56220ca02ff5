"""Twenty JSON schemas of the kinds structured-output users send: nested objects, arrays,
enums, required fields, numbers with bounds, optional fields, strings of bounded length (a
135M model left unbounded may write one string until max_tokens)."""

NAME = {"type": "string", "maxLength": 24}
TEXT = {"type": "string", "maxLength": 60}

SCHEMAS = [
    {"type": "object", "properties": {"name": NAME, "age": {"type": "integer"}}, "required": ["name", "age"]},
    {"type": "object", "properties": {"city": NAME, "population": {"type": "integer", "minimum": 0}},
     "required": ["city", "population"]},
    {"type": "object", "properties": {"color": {"type": "string", "enum": ["red", "green", "blue"]}},
     "required": ["color"]},
    {"type": "object", "properties": {"title": TEXT, "tags": {"type": "array", "items": NAME, "maxItems": 4}},
     "required": ["title", "tags"]},
    {"type": "object", "properties": {"author": {"type": "object", "properties": {"first": NAME, "last": NAME},
                                                 "required": ["first", "last"]}, "year": {"type": "integer"}},
     "required": ["author", "year"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "reason": TEXT}, "required": ["ok"]},
    {"type": "object", "properties": {"price": {"type": "number", "minimum": 0, "maximum": 1000},
                                      "currency": {"enum": ["USD", "EUR", "GBP"]}}, "required": ["price", "currency"]},
    {"type": "array", "items": {"type": "integer"}, "minItems": 3, "maxItems": 5},
    {"type": "object", "properties": {"steps": {"type": "array", "items": TEXT, "minItems": 2, "maxItems": 3}},
     "required": ["steps"]},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {"x": {"type": "number"},
                                                                               "y": {"type": "number"}},
                                                "required": ["x", "y"]}}, "required": ["point"]},
    {"type": "object", "properties": {"sentiment": {"enum": ["positive", "negative", "neutral"]},
                                      "confidence": {"type": "number", "minimum": 0, "maximum": 1}},
     "required": ["sentiment", "confidence"]},
    {"type": "object", "properties": {"id": {"type": "integer"}, "email": NAME, "admin": {"type": "boolean"}},
     "required": ["id", "email", "admin"]},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 3, "items": {
        "type": "object", "properties": {"name": NAME, "qty": {"type": "integer"}}, "required": ["name", "qty"]}}},
     "required": ["items"]},
    {"type": "object", "properties": {"answer": {"type": "integer", "minimum": -1000, "maximum": 1000}, "explanation": TEXT},
     "required": ["answer"]},
    {"type": "object", "properties": {"language": {"enum": ["python", "rust", "go", "c"]}, "stars": {"type": "integer"}},
     "required": ["language", "stars"]},
    {"type": "object", "properties": {"event": NAME, "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}},
     "required": ["event", "date"]},
    {"type": "object", "properties": {"matrix": {"type": "array", "maxItems": 2, "items": {
        "type": "array", "items": {"type": "integer"}, "maxItems": 2}}}, "required": ["matrix"]},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "name": NAME, "address": {"type": "object", "properties": {"street": NAME, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                                  "required": ["street", "zip"]}}, "required": ["name", "address"]}}, "required": ["user"]},
    {"type": "object", "properties": {"status": {"enum": ["open", "closed"]}, "count": {"type": "integer", "minimum": 1,
                                                                                          "maximum": 9}},
     "required": ["status", "count"]},
    {"type": "object", "properties": {"summary": TEXT, "keywords": {"type": "array", "items": {"enum": ["a", "b", "c"]},
                                                                    "maxItems": 3}},
     "required": ["summary", "keywords"]},
]
