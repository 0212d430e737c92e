// Renders Ollama TEMPLATEs with Go's own text/template, configured as Ollama configures it
// (missingkey=zero and its one extra function, "json"). Reads a JSON list of
// {"template": ..., "values": {...}} from stdin and writes the JSON list of rendered texts.
// Used by tests/export/test_ollama_template.py only.
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type request struct {
	Template string         `json:"template"`
	Values   map[string]any `json:"values"`
}

func main() {
	var requests []request
	if err := json.NewDecoder(os.Stdin).Decode(&requests); err != nil {
		os.Stderr.WriteString("bad input: " + err.Error() + "\n")
		os.Exit(2)
	}
	funcs := template.FuncMap{"json": func(v any) string { b, _ := json.Marshal(v); return string(b) }}
	rendered := make([]string, 0, len(requests))
	for _, r := range requests {
		t, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(r.Template)
		if err != nil {
			os.Stderr.WriteString("parse: " + err.Error() + "\n")
			os.Exit(3)
		}
		var out strings.Builder
		if err := t.Execute(&out, r.Values); err != nil {
			os.Stderr.WriteString("execute: " + err.Error() + "\n")
			os.Exit(4)
		}
		rendered = append(rendered, out.String())
	}
	json.NewEncoder(os.Stdout).Encode(rendered)
}
