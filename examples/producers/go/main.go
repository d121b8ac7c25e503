// A duogen producer in Go: redigo and the Go protobuf runtime (Debian: golang-go,
// golang-github-gomodule-redigo-dev, golang-google-protobuf-dev, protoc-gen-go).
//
//	go-producer --redis URL [--tls-ca-file FILE] --id ID --image FILE --out DIR [--prefix P] [--meta KEY=VALUE]... TEXT...
//
// Enqueues one job (the image, then the text, as the user's message), follows its events,
// waits for its result and writes DIR/answer.md with DIR/image-N.png. The package duogen/pb
// is generated from proto/duogen.proto:
//
//	protoc --proto_path=proto --go_out=DIR/src/duogen/pb --go_opt=paths=source_relative \
//	       --go_opt=Mduogen.proto=duogen/pb proto/duogen.proto
//
// and `make` builds this file into build/producers/go-producer in GOPATH mode over Debian's
// /usr/share/gocode (GO111MODULE=off: nothing is downloaded). examples/producers/README.md
// says what every producer of this folder prints and exits with.
package main

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	neturl "net/url"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"duogen/pb"

	"github.com/gomodule/redigo/redis"
	"google.golang.org/protobuf/proto"
)

const (
	exitJob   = 1
	exitUsage = 2
	exitIO    = 3
	timeout   = 120 * time.Second
)

type metaFlags []string

func (m *metaFlags) String() string { return strings.Join(*m, ",") }
func (m *metaFlags) Set(v string) error {
	if !strings.Contains(v, "=") {
		return errors.New("expected KEY=VALUE")
	}
	*m = append(*m, v)
	return nil
}

func fail(code int, format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "producer: "+format+"\n", args...)
	os.Exit(code)
}

func buildJob(id string, image []byte, text string, meta metaFlags) *pb.Job {
	job := &pb.Job{Id: id, Metadata: map[string]string{}}
	job.Messages = []*pb.Message{{
		Role: pb.Message_USER,
		Parts: []*pb.Part{
			{Kind: &pb.Part_Image{Image: &pb.Image{Source: &pb.Image_Data{Data: image}}}},
			{Kind: &pb.Part_Text{Text: text}},
		},
	}}
	for _, kv := range meta {
		k, v, _ := strings.Cut(kv, "=")
		job.Metadata[k] = v
	}
	return job
}

// eventLine is the line printed for one event ("" for text deltas) and whether it is the
// job's last.
func eventLine(ev *pb.Event) (string, bool) {
	switch p := ev.Payload.(type) {
	case *pb.Event_Started_:
		return fmt.Sprintf("started worker=%s attempt=%d", p.Started.WorkerId, p.Started.Attempt), false
	case *pb.Event_ImageStarted_:
		s := p.ImageStarted
		return fmt.Sprintf("image %d started %dx%d steps=%d", s.Index, s.Width, s.Height, s.Steps), false
	case *pb.Event_Step:
		return fmt.Sprintf("image %d step %d/%d", p.Step.Index, p.Step.Step, p.Step.Steps), false
	case *pb.Event_ImageDone_:
		where := p.ImageDone.Key // a key, or a file (output_root)
		if where == "" {
			where = p.ImageDone.Path
		}
		return fmt.Sprintf("image %d done %s", p.ImageDone.Index, where), false
	case *pb.Event_Done_:
		return strings.ToLower(p.Done.Status.String()), true
	case *pb.Event_Failed_:
		return fmt.Sprintf("failed %s: %s", p.Failed.GetError().GetCode(), p.Failed.GetError().GetMessage()), true
	case *pb.Event_Cancelled_:
		return "cancelled", true
	}
	return "", false
}

// follow prints the job's events from its first until its final one.
func follow(c redis.Conn, eventsKey string) error {
	last, deadline := "0", time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		// [[stream, [[entry id, [field, value, ...]], ...]]], or nil after the BLOCK
		streams, err := redis.Values(c.Do("XREAD", "COUNT", 100, "BLOCK", 1000, "STREAMS", eventsKey, last))
		if errors.Is(err, redis.ErrNil) {
			continue
		} else if err != nil {
			return err
		}
		stream, _ := redis.Values(streams[0], nil)
		entries, _ := redis.Values(stream[1], nil)
		for _, e := range entries {
			entry, _ := redis.Values(e, nil)
			last, _ = redis.String(entry[0], nil)
			fields, _ := redis.StringMap(entry[1], nil)
			ev := &pb.Event{}
			if err := proto.Unmarshal([]byte(fields["pb"]), ev); err != nil {
				return fmt.Errorf("%s %s: %v", eventsKey, last, err)
			}
			line, final := eventLine(ev)
			if line != "" {
				fmt.Println(line)
			}
			if final {
				return nil
			}
		}
	}
	return fmt.Errorf("no final event on %s within %v", eventsKey, timeout)
}

// writeAnswer writes answer.md (the text parts as they are, each image as a Markdown link to
// its file between blank lines, as the worker's result text has them) and image-N.png.
func writeAnswer(c redis.Conn, res *pb.Result, dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	var md strings.Builder
	n := 0
	for _, part := range res.Output {
		if t, ok := part.Kind.(*pb.Part_Text); ok {
			md.WriteString(t.Text)
			continue
		}
		im := part.GetImage()
		var data []byte
		var err error
		switch src := im.Source.(type) {
		case *pb.Image_Data: // the job asked for inline_images
			data = src.Data
		case *pb.Image_Path: // the worker wrote it to a shared file system
			data, err = os.ReadFile(src.Path)
		default:
			if data, err = redis.Bytes(c.Do("GET", im.Key)); err != nil {
				err = fmt.Errorf("%s: %v", im.Key, err)
			}
		}
		if err != nil {
			return err
		}
		n++
		if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("image-%d.png", n)), data, 0o644); err != nil {
			return err
		}
		fmt.Fprintf(&md, "\n\n![image %d](image-%d.png)\n\n", n, n)
	}
	if err := os.WriteFile(filepath.Join(dir, "answer.md"), []byte(md.String()), 0o644); err != nil {
		return err
	}
	fmt.Printf("wrote %s/answer.md and %d image(s)\n", dir, n)
	return nil
}

func main() {
	url := flag.String("redis", "redis://127.0.0.1:6379/0", "Redis URL (rediss:// for TLS)")
	caFile := flag.String("tls-ca-file", "", "with rediss://: the CA that signed the server's certificate (default: the system's)")
	prefix := flag.String("prefix", "duogen", "key prefix")
	id := flag.String("id", "", "job id")
	imagePath := flag.String("image", "", "input image (PNG or JPEG)")
	out := flag.String("out", "", "directory for answer.md and the images")
	var meta metaFlags
	flag.Var(&meta, "meta", "KEY=VALUE job metadata (again for more)")
	flag.CommandLine.Init("go-producer", flag.ContinueOnError)
	if err := flag.CommandLine.Parse(os.Args[1:]); err != nil || *id == "" || *imagePath == "" || *out == "" || flag.NArg() == 0 {
		fail(exitUsage, "usage: go-producer --redis URL [--tls-ca-file FILE] --id ID --image FILE --out DIR [--prefix P] [--meta KEY=VALUE]... TEXT...")
	}
	// the ids a worker accepts; another would be dead-lettered under an id of the worker's
	// own, and this producer would wait for a result that never comes
	if !regexp.MustCompile(`^[A-Za-z0-9._:-]{1,128}$`).MatchString(*id) {
		fail(exitUsage, "--id %q is not 1..128 characters of A-Z a-z 0-9 . _ : -", *id)
	}
	// a URL of another scheme is the command line's mistake, not Redis's (redigo takes
	// redis:// and rediss://)
	if u, perr := neturl.Parse(*url); perr != nil || (u.Scheme != "redis" && u.Scheme != "rediss") {
		fail(exitUsage, "--redis: expected redis://host:port/db or rediss://host:port/db")
	}
	image, err := os.ReadFile(*imagePath)
	if err != nil {
		fail(exitIO, "%v", err)
	}
	raw, err := proto.Marshal(buildJob(*id, image, strings.Join(flag.Args(), " "), meta))
	if err != nil {
		fail(exitIO, "%v", err)
	}
	options := []redis.DialOption{redis.DialReadTimeout(30 * time.Second), redis.DialConnectTimeout(10 * time.Second)}
	if *caFile != "" {
		pem, err := os.ReadFile(*caFile)
		if err != nil {
			fail(exitIO, "%v", err)
		}
		roots := x509.NewCertPool()
		if !roots.AppendCertsFromPEM(pem) {
			fail(exitIO, "--tls-ca-file %s: no PEM certificate in it", *caFile)
		}
		options = append(options, redis.DialTLSConfig(&tls.Config{RootCAs: roots}))
	}
	c, err := redis.DialURL(*url, options...)
	if err != nil {
		shown := "--redis" // never the password a URL holds
		if u, perr := neturl.Parse(*url); perr == nil {
			shown = u.Redacted()
		}
		fail(exitIO, "Redis %s: %v", shown, err)
	}
	defer c.Close()
	// "queued" before the XADD: a worker's "running" comes after it
	if _, err := c.Do("HSETNX", *prefix+":job:"+*id, "state", "queued"); err != nil {
		fail(exitIO, "HSETNX: %v", err)
	}
	if _, err := c.Do("XADD", *prefix+":jobs", "*", "id", *id, "job", raw); err != nil {
		fail(exitIO, "XADD: %v", err)
	}
	fmt.Printf("enqueued %s\n", *id)
	if err := follow(c, *prefix+":events:"+*id); err != nil {
		fail(exitIO, "%v", err)
	}
	rawResult, err := redis.Bytes(c.Do("HGET", *prefix+":result:"+*id, "pb")) // written with the final event
	if err != nil {
		fail(exitIO, "no result for %s: %v", *id, err)
	}
	res := &pb.Result{}
	if err := proto.Unmarshal(rawResult, res); err != nil {
		fail(exitIO, "result of %s: %v", *id, err)
	}
	if err := writeAnswer(c, res, *out); err != nil {
		fail(exitIO, "%v", err)
	}
	if res.Status != pb.Result_DONE {
		os.Exit(exitJob)
	}
}
