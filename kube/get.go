package kube

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"sigs.k8s.io/yaml"
)

// ErrUsage wraps a bad `get` subject or output format.
var ErrUsage = errors.New("usage")

// GetSubjects are what `shardlb get` shows.
var GetSubjects = []string{"ha", "ip", "lb", "bgp", "services"}

// Get fetches one subject (ha, ip, lb, bgp, services) from a pod's local API at apiAddr
// (host:port) and writes it as a loxicmd-style table ("table"), a table with more
// columns ("wide"), indented JSON ("json") or YAML ("yaml").
func Get(ctx context.Context, apiAddr, what, output string, w io.Writer) error {
	if output == "" {
		output = "table"
	}
	what, err := CheckGet(what, output)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+apiAddr+"/v1/"+what, nil)
	if err != nil {
		return fmt.Errorf("get %s: %w", what, err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("get %s from %s (is shardlb running there?): %w", what, apiAddr, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return fmt.Errorf("get %s: %w", what, err)
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("get %s: %s: %s", what, resp.Status, bytes.TrimSpace(body))
	}
	if output == "yaml" {
		y, err := yaml.JSONToYAML(body)
		if err != nil {
			return fmt.Errorf("get %s: %w", what, err)
		}
		_, err = w.Write(y)
		return err
	}
	if output == "json" {
		var buf bytes.Buffer
		if err := json.Indent(&buf, body, "", "  "); err != nil {
			return fmt.Errorf("get %s: %w", what, err)
		}
		_, err := w.Write(buf.Bytes())
		return err
	}
	header, rows, err := tabulate(what, body, output == "wide")
	if err != nil {
		return fmt.Errorf("get %s: %w", what, err)
	}
	return renderTable(w, header, rows)
}

// GetOutputs are the output formats of `shardlb get`.
var GetOutputs = []string{"table", "wide", "json", "yaml"}

// CheckGet checks a `get` subject and output format before anything is fetched, and
// returns the subject's canonical name (svc and service are services). Its errors
// wrap ErrUsage.
func CheckGet(what, output string) (string, error) {
	switch what {
	case "ha", "ip", "lb", "bgp", "services":
	case "svc", "service":
		what = "services"
	default:
		return "", fmt.Errorf("%w: unknown subject %q, want one of %s", ErrUsage, what, strings.Join(GetSubjects, ", "))
	}
	if !slices.Contains(GetOutputs, output) {
		return "", fmt.Errorf("%w: unknown output %q, want one of %s", ErrUsage, output, strings.Join(GetOutputs, ", "))
	}
	return what, nil
}

func tabulate(what string, body []byte, wide bool) ([]string, [][]string, error) {
	var header []string
	var rows [][]string
	switch what {
	case "ha":
		var rs []HARow
		if err := json.Unmarshal(body, &rs); err != nil {
			return nil, nil, err
		}
		header = []string{"INSTANCE", "HASTATE"}
		if wide {
			header = append(header, "MASTER")
		}
		for _, r := range rs {
			row := []string{r.Instance, r.State}
			if wide {
				row = append(row, r.Master)
			}
			rows = append(rows, row)
		}
	case "ip":
		var rs []IPRow
		if err := json.Unmarshal(body, &rs); err != nil {
			return nil, nil, err
		}
		header = []string{"INSTANCE", "IP", "ROLE"}
		if wide {
			header = append(header, "SERVICES")
		}
		for _, r := range rs {
			row := []string{r.Instance, r.IP, r.Role}
			if wide {
				row = append(row, strings.Join(r.Services, ","))
			}
			rows = append(rows, row)
		}
	case "lb":
		var rs []LBRow
		if err := json.Unmarshal(body, &rs); err != nil {
			return nil, nil, err
		}
		header = []string{"EXT IP", "PORT", "PROTO", "NAME", "SEL", "MODE", "# OF ENDPOINTS"}
		if wide {
			header = append(header, "ENDPOINTS", "SOURCE RANGES", "CLIENT ADDR")
		}
		for _, r := range rs {
			row := []string{r.ExtIP, strconv.Itoa(int(r.Port)), r.Protocol, r.Name, r.Select, r.Mode, strconv.Itoa(len(r.Endpoints))}
			if wide {
				ranges := strings.Join(r.SourceRanges, ",")
				if ranges == "" {
					ranges = "any"
				}
				row = append(row, strings.Join(r.Endpoints, ","), ranges, r.ClientAddr)
			}
			rows = append(rows, row)
		}
	case "bgp":
		var rs []BGPPeer
		if err := json.Unmarshal(body, &rs); err != nil {
			return nil, nil, err
		}
		header = []string{"PEER", "AS", "UP/DOWN", "STATE"}
		for _, r := range rs {
			rows = append(rows, []string{r.Peer, strconv.FormatUint(uint64(r.AS), 10), r.Uptime, r.State})
		}
	case "services":
		var rs []ServiceRow
		if err := json.Unmarshal(body, &rs); err != nil {
			return nil, nil, err
		}
		header = []string{"SERVICE", "VIP", "INSTANCE", "MASTER"}
		if wide {
			header = append(header, "PORTS", "ENDPOINTS")
		}
		for _, r := range rs {
			vip := strings.Join(r.VIPs, ",")
			if vip == "" {
				vip = "<pending>"
			}
			row := []string{r.Service, vip, r.Instance, r.Master}
			if wide {
				row = append(row, strings.Join(r.Ports, ","), strconv.Itoa(r.Endpoints))
			}
			rows = append(rows, row)
		}
	}
	return header, rows, nil
}

// renderTable writes loxicmd's layout:
//
//	| INSTANCE  | HASTATE |
//	|-----------|---------|
//	| default   | BACKUP  |
func renderTable(w io.Writer, header []string, rows [][]string) error {
	width := make([]int, len(header))
	for i, h := range header {
		width[i] = len(h)
	}
	for _, r := range rows {
		for i, c := range r {
			width[i] = max(width[i], len(c))
		}
	}
	var b bytes.Buffer
	line := func(cells []string) {
		for i, c := range cells {
			fmt.Fprintf(&b, "| %-*s ", width[i], c)
		}
		b.WriteString("|\n")
	}
	line(header)
	for i := range header {
		b.WriteString("|" + strings.Repeat("-", width[i]+2))
	}
	b.WriteString("|\n")
	for _, r := range rows {
		line(r)
	}
	_, err := w.Write(b.Bytes())
	return err
}
