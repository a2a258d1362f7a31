// A fast fake OpenAI-compatible model server for loadtest/run-provider-benchmark.sh: every
// POST /v1/chat/completions streams -tokens SSE chunks at -rate per second, then a usage chunk and
// [DONE]. Prints "listening PORT". Build: GO111MODULE=off go build -o fake-upstream fake-upstream.go
package main

import (
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"time"
)

func main() {
	tokens := flag.Int("tokens", 200, "")
	rate := flag.Float64("rate", 100, "tokens/s per stream")
	flag.Parse()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil { panic(err) }
	fmt.Println("listening", ln.Addr().(*net.TCPAddr).Port)
	os.Stdout.Sync()
	iv := time.Duration(float64(time.Second) / *rate)
	http.HandleFunc("/v1/chat/completions", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		f := w.(http.Flusher)
		start := time.Now()
		for i := 0; i < *tokens; i++ {
			time.Sleep(time.Until(start.Add(time.Duration(i) * iv)))
			fmt.Fprintf(w, "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"fake\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" tok%d\"},\"finish_reason\":null}]}\n\n", i)
			f.Flush()
		}
		fmt.Fprintf(w, "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"fake\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":20,\"completion_tokens\":%d,\"total_tokens\":%d}}\n\ndata: [DONE]\n\n", *tokens, *tokens+20)
		f.Flush()
	})
	http.Serve(ln, nil)
}
