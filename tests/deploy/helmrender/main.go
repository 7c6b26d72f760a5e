// A stand-in for `helm template` where no helm binary can be had: Go's text/template (the
// engine helm itself runs) with the handful of helm/sprig functions the chart uses, each with
// sprig's argument order and meaning. Strict: a missing value key is an error (missingkey=error).
//
//	go run main.go CHART_DIR VALUES_JSON CHART_JSON RELEASE_NAME NAMESPACE
//
// VALUES_JSON / CHART_JSON: values.yaml and Chart.yaml as JSON (the test converts them).
// Prints every rendered template (not _*.tpl, not NOTES.txt) as YAML documents with
// "# Source:" headers, as helm does; empty output is skipped.
package main

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"text/template"
)

// Files is .Files restricted to what the chart calls: Glob(pattern).AsConfig.
type Files map[string][]byte

func (f Files) Glob(pattern string) Files {
	out := Files{}
	for name, data := range f {
		if ok, _ := path.Match(pattern, name); ok {
			out[name] = data
		}
	}
	return out
}

// AsConfig: base name -> content, one YAML mapping (JSON-quoted scalars are valid YAML).
func (f Files) AsConfig() string {
	names := make([]string, 0, len(f))
	for n := range f {
		names = append(names, n)
	}
	sort.Strings(names)
	lines := make([]string, 0, len(names))
	for _, n := range names {
		k, _ := json.Marshal(path.Base(n))
		v, _ := json.Marshal(string(f[n]))
		lines = append(lines, fmt.Sprintf("%s: %s", k, v))
	}
	return strings.Join(lines, "\n")
}

func indent(n int, s string) string {
	pad := strings.Repeat(" ", n)
	return pad + strings.ReplaceAll(s, "\n", "\n"+pad)
}

func empty(v interface{}) bool {
	switch x := v.(type) {
	case nil:
		return true
	case string:
		return x == ""
	case bool:
		return !x
	case float64:
		return x == 0
	case int:
		return x == 0
	case []interface{}:
		return len(x) == 0
	case map[string]interface{}:
		return len(x) == 0
	}
	return false
}

func funcs(root *template.Template) template.FuncMap {
	return template.FuncMap{
		"include": func(name string, data interface{}) (string, error) {
			var buf bytes.Buffer
			err := root.ExecuteTemplate(&buf, name, data)
			return buf.String(), err
		},
		"toYaml": func(v interface{}) (string, error) { // flow style: JSON is YAML
			b, err := json.Marshal(v)
			return string(b), err
		},
		"nindent":    func(n int, s string) string { return "\n" + indent(n, s) },
		"indent":     indent,
		"quote":      func(v interface{}) string { return fmt.Sprintf("%q", fmt.Sprint(v)) },
		"sha256sum":  func(s string) string { h := sha256.Sum256([]byte(s)); return hex.EncodeToString(h[:]) },
		"contains":   func(sub, s string) bool { return strings.Contains(s, sub) },
		"trimSuffix": func(suffix, s string) string { return strings.TrimSuffix(s, suffix) },
		"trunc": func(n int, s string) string {
			if len(s) > n {
				return s[:n]
			}
			return s
		},
		"default": func(d interface{}, v ...interface{}) interface{} {
			if len(v) == 0 || empty(v[0]) {
				return d
			}
			return v[0]
		},
		"dict": func(kv ...interface{}) (map[string]interface{}, error) {
			if len(kv)%2 != 0 {
				return nil, fmt.Errorf("dict: odd number of arguments")
			}
			m := map[string]interface{}{}
			for i := 0; i < len(kv); i += 2 {
				m[fmt.Sprint(kv[i])] = kv[i+1]
			}
			return m, nil
		},
	}
}

func readJSON(file string) map[string]interface{} {
	raw, err := os.ReadFile(file)
	must(err)
	var v map[string]interface{}
	must(json.Unmarshal(raw, &v))
	return v
}

func must(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "helmrender:", err)
		os.Exit(1)
	}
}

func main() {
	if len(os.Args) != 6 {
		must(fmt.Errorf("usage: main.go CHART_DIR VALUES_JSON CHART_JSON RELEASE NAMESPACE"))
	}
	dir := os.Args[1]
	files := Files{}
	must(filepath.Walk(dir, func(p string, info os.FileInfo, err error) error {
		if err != nil || info.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		data, err := os.ReadFile(p)
		files[filepath.ToSlash(rel)] = data
		return err
	}))
	root := template.New("chart").Option("missingkey=error")
	root.Funcs(funcs(root))
	names := []string{}
	for name, data := range files {
		if strings.HasPrefix(name, "templates/") {
			_, err := root.New(name).Parse(string(data))
			must(err)
			names = append(names, name)
		}
	}
	sort.Strings(names)
	chart := readJSON(os.Args[3])
	ctx := map[string]interface{}{
		"Values":  readJSON(os.Args[2]),
		"Chart":   map[string]interface{}{"Name": chart["name"], "Version": chart["version"], "AppVersion": chart["appVersion"]},
		"Release": map[string]interface{}{"Name": os.Args[4], "Namespace": os.Args[5], "Service": "Helm"},
		"Files":   files,
	}
	for _, name := range names {
		base := path.Base(name)
		if strings.HasPrefix(base, "_") || base == "NOTES.txt" {
			continue
		}
		var buf bytes.Buffer
		must(root.ExecuteTemplate(&buf, name, ctx))
		if strings.TrimSpace(buf.String()) == "" {
			continue
		}
		fmt.Printf("---\n# Source: %s/%s\n%s\n", chart["name"], name, buf.String())
	}
}
